"""Tuned Triton launch configs, kept as data (one JSON file per kernel family, problem shape and GPU).

A file is named like vLLM's: ``moe_ffn,d=768,h=3072,E=4,device_name=NVIDIA_H200.json`` (the device
name as ``torch.cuda.get_device_name`` gives it, spaces as ``_``). Its content::

    {"meta": {"device_name": ..., "triton": ..., "date": ..., "command": ...},
     "configs": {kind: {dtype: {token bucket: {"block_m": 128, "block_n": 128, "block_k": 64,
                                               "num_warps": 8, "num_stages": 4, "chunk": 0}}}}}

``kind`` is a launcher's config kind (``"gemm"``, ``"hidden"``, ``"dw"`` for ``moe_ffn``), ``dtype``
is ``"float32"``/``"float16"``/``"bfloat16"`` and the bucket a token count; a lookup takes the
nearest bucket. Folders searched, first hit wins: ``$MOEBERT_TRITON_CONFIG_DIR`` (a user's own
tuning), then this package's folder. ``benchmarks/tune_triton.py`` writes these files.
"""
from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

__all__ = ["CONFIG_DIR_ENV", "config_file_name", "load_table", "lookup", "write_table"]

CONFIG_DIR_ENV = "MOEBERT_TRITON_CONFIG_DIR"
PACKAGE_DIR = Path(__file__).resolve().parent
FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "chunk")


def config_file_name(family: str, shape: dict, device_name: str) -> str:
    """``family,k=v,...,device_name=NAME.json`` with the shape in the given order."""
    dims = ",".join(f"{k}={v}" for k, v in shape.items())
    return f"{family},{dims},device_name={device_name.replace(' ', '_')}.json"


def load_table(family: str, shape: dict, device_name: str) -> Optional[dict]:
    """The ``configs`` table of the first matching file, or None when no folder has one."""
    return _load(family, tuple(shape.items()), device_name, os.environ.get(CONFIG_DIR_ENV, ""))


@lru_cache(maxsize=None)
def _load(family: str, shape: tuple, device_name: str, user_dir: str) -> Optional[dict]:
    # user_dir is part of the cache key, so changing the env variable is seen; a file is read once.
    name = config_file_name(family, dict(shape), device_name)
    for folder in ([Path(user_dir)] if user_dir else []) + [PACKAGE_DIR]:
        path = folder / name
        if path.is_file():
            return _read(str(path))
    return None


def _read(path: str) -> dict:
    """Parse and check one file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"tuned Triton config file {path} is unreadable ({err}); fix or delete it, or rerun "
                         f"benchmarks/tune_triton.py") from err
    table = data.get("configs") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"tuned Triton config file {path} has no 'configs' table; rerun benchmarks/tune_triton.py")
    out = {}
    for kind, by_dtype in table.items():
        for dtype, by_bucket in by_dtype.items():
            for bucket, cfg in by_bucket.items():
                missing = [k for k in FIELDS[:5] if k not in cfg]
                unknown = [k for k in cfg if k not in FIELDS]
                if missing or unknown or not str(bucket).isdigit():
                    raise ValueError(f"tuned Triton config file {path}: entry {kind}/{dtype}/{bucket} is malformed "
                                     f"(missing {missing}, unknown {unknown}; buckets are token counts); rerun "
                                     f"benchmarks/tune_triton.py")
                out.setdefault(kind, {}).setdefault(dtype, {})[int(bucket)] = dict(cfg)
    return out


def lookup(table: Optional[dict], kind: str, dtype: str, tokens: int) -> Optional[dict]:
    """The entry of the bucket nearest to ``tokens`` (ties: the smaller bucket), or None."""
    by_bucket = (table or {}).get(kind, {}).get(dtype)
    if not by_bucket:
        return None
    return by_bucket[min(by_bucket, key=lambda b: (abs(b - tokens), b))]


def write_table(folder: str, family: str, shape: dict, device_name: str, table: dict, meta: dict) -> Path:
    """Write a config file whole (temp file, then rename) and return its path."""
    folder_path = Path(folder)
    folder_path.mkdir(parents=True, exist_ok=True)
    path = folder_path / config_file_name(family, shape, device_name)
    body = {"meta": dict(meta, device_name=device_name),
            "configs": {k: {dt: {str(b): c for b, c in sorted(v.items())} for dt, v in by.items()}
                        for k, by in table.items()}}
    fd, tmp = tempfile.mkstemp(dir=folder_path, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
