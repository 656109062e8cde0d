"""Finds and loads the compiled ``moebert_kernels._C`` extension, and says why when it cannot."""
from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType
from typing import Optional

__all__ = ["load", "extension_error"]


@lru_cache(maxsize=None)
def load() -> tuple[Optional[ModuleType], str]:
    """Return ``(module, "")`` or ``(None, reason)``. Loading registers the ``moebert_C`` ops."""
    import torch

    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build; the cuda backend needs a CUDA build of torch"
    try:
        ext = importlib.import_module("moebert_kernels._C")
    except ModuleNotFoundError:
        return None, (
            "the CUDA extension moebert_kernels._C is not built; build it with "
            "`MOEBERT_BUILD_CUDA=1 pip install --no-build-isolation -e .` on a machine with nvcc"
        )
    except (ImportError, OSError) as exc:
        # Typically built against another torch (undefined symbol) or a missing libcudart.
        return None, f"moebert_kernels._C exists but failed to load ({exc}); rebuild it against torch {torch.__version__}"
    if not torch.cuda.is_available():
        return None, "moebert_kernels._C is built but no CUDA device is available"
    archs = getattr(ext, "cuda_archs", "")
    cap = torch.cuda.get_device_capability()
    if archs and not arch_supported(archs, cap):
        return None, (f"moebert_kernels._C was built for {archs!r} but this GPU is sm_{cap[0]}{cap[1]}; "
                      f"rebuild with TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")
    return ext, ""


def arch_supported(archs: str, capability: tuple[int, int]) -> bool:
    """Whether a build for ``archs`` ("8.0,9.0+PTX") has code that runs on ``capability``.

    SASS for M.m runs on M.n with n >= m; PTX for M.m is JIT-compiled on anything newer.
    """
    for entry in archs.replace(";", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        try:
            major, minor = (int(v) for v in entry.removesuffix("+PTX").rstrip("a").split("."))
        except ValueError:
            return True  # a spelling we do not know: do not block, the driver will say
        if (major == capability[0] and minor <= capability[1]) or (ptx and (major, minor) <= capability):
            return True
    return False


def extension_error() -> str:
    return load()[1]
