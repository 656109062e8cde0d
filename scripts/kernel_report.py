#!/usr/bin/env python3
"""Static report of every GPU kernel this package can launch, compiled without a GPU.

    python scripts/kernel_report.py [--json FILE] [--arch sm_90a,sm_80] [--dtypes bf16,fp16,fp32]
                                    [--cuda-so PATH | --no-cuda] [--check] [--jobs N]

Triton: the launchers themselves decide what is compiled. Each launcher of ``moebert_kernels.triton``
(moe_ffn forward and backward, distill_loss, expert_layer_norm) runs on ``meta`` tensors with every kernel
replaced by a recorder, over every token bucket, dtype and BERT size the heuristic can see, and over every
tuned config found in ``moebert_kernels/triton/configs/*.json``. A recorded launch is specialised the way
Triton's JIT would specialise it on a GPU (its own binder: pointers 16-byte aligned, ints equal to 1 or
divisible by 16), then compiled for each arch in a pool of processes (Triton's cache makes a rerun cheap).
CUDA C++: every kernel in the fatbin of ``moebert_kernels/_C*.so`` (or ``--cuda-so``), per arch.

Per kernel and config: registers, spilled bytes (stack + local: the frame that LDL/STL use), shared memory,
CTAs per SM (the least of what registers, shared memory, threads and the 32-CTA cap allow), and the SASS
counts of HGMMA (Hopper wgmma), HMMA (mma.sync), UTMALDG (TMA loads) and LDGSTS (cp.async), from
``cuobjdump --dump-resource-usage`` and ``cuobjdump -sass``.

``--check`` exits 1 on a violation (``violations()``; tests/test_kernel_report.py enforces it in CI):
a GEMM that spills, a 16-bit sm_90 GEMM without HGMMA, shared memory over the arch's per-block limit, or a
kernel that cannot fit one CTA on an SM. A kernel is a GEMM when its Triton IR has ``tt.dot`` (CUDA C++:
its SASS has HMMA/HGMMA or its own name, not a template argument, says gemm: ``named_gemm``). fp32 GEMMs in
IEEE precision run on FMA units by design, so the HGMMA rule covers 16-bit (and TF32) operands only. CUDA C++ shared memory is the static part only
(CUTLASS sizes its dynamic shared memory at launch).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCHS = {"sm_90a": 90, "sm_80": 80}  # what Triton compiles for (sm_90 means sm_90a to it)
RULES = ("spill", "hgmma", "smem", "fit")  # what violations() checks; --check RULES picks some
# Per-SM and per-block limits (CUDA programming guide, compute capabilities 8.0 and 9.0).
LIMITS = {
    80: dict(regs_per_sm=65536, smem_per_sm=167936, smem_per_block=166912, threads_per_sm=2048, ctas_per_sm=32,
             smem_reserved_per_cta=1024),
    90: dict(regs_per_sm=65536, smem_per_sm=233472, smem_per_block=232448, threads_per_sm=2048, ctas_per_sm=32,
             smem_reserved_per_cta=1024),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Token buckets the launchers key on (16 .. 65536) and the expert shapes they run at: the benchmark's
# (d = h = 768, E = 4) and BERT-base and -large FFN widths. With E = 4 the buckets give 4 .. 16384 tokens per
# expert, every branch of the heuristic; other expert counts would only add copies that differ in E_POW2 or in
# what the JIT specialises on (E == 1, E % 16 == 0).
BUCKETS = [1 << i for i in range(4, 17)]
SHAPES = [(768, 768, 4), (768, 3072, 4), (1024, 4096, 4)]
FIELDS = ("kernel", "backend", "arch", "dtype", "config", "variant", "registers", "spill_bytes", "smem_bytes",
          "ctas_per_sm", "hgmma", "hmma", "tma_loads", "cp_async", "local_loads", "local_stores", "threads",
          "gemm", "shapes")
SASS_COUNTS = {"hgmma": r"\bHGMMA\.", "hmma": r"\bHMMA\.", "tma_loads": r"\bUTMALDG\b", "cp_async": r"\bLDGSTS\b",
               "local_loads": r"\bLDL\b", "local_stores": r"\bSTL\b"}


# ---- tools --------------------------------------------------------------------------------------------------

def cuobjdump() -> str:
    """cuobjdump from PATH, the CUDA toolkit, or the copy that Triton's NVIDIA backend ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for folder in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        cand = Path(folder, "bin", "cuobjdump")
        if folder and cand.exists():
            return str(cand)
    import triton
    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cand.exists():
        return str(cand)
    raise SystemExit("kernel_report: cuobjdump not found (PATH, $CUDA_HOME/bin, triton's backends/nvidia/bin); "
                     "install the CUDA toolkit or triton's NVIDIA backend")


def parse_resource_usage(text: str) -> dict:
    """``{(arch or None, symbol): {REG, STACK, SHARED, LOCAL}}`` from ``cuobjdump --dump-resource-usage``."""
    out, arch, fn = {}, None, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch = s.split("=", 1)[1].strip()
        elif s.startswith("Function ") and s.endswith(":"):
            fn = s[len("Function "):-1]
        elif fn is not None and s.startswith("REG:"):
            out[(arch, fn)] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", s)}
            fn = None
    return out


def parse_sass(text: str) -> dict:
    """``{(arch or None, symbol): {count name: n}}`` from ``cuobjdump -sass``."""
    bodies, arch, fn = {}, None, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch, fn = s.split("=", 1)[1].strip(), None
        elif s.startswith("Function : "):
            fn = s[len("Function : "):]
            bodies[(arch, fn)] = []
        elif fn is not None and s.startswith("/*"):
            bodies[(arch, fn)].append(s)
    return {k: {name: len(re.findall(rx, "\n".join(v))) for name, rx in SASS_COUNTS.items()}
            for k, v in bodies.items()}


def arch_number(name: str) -> int:
    """sm_90a, sm_90 -> 90; sm_80 -> 80 (a fatbin may hold either Hopper flavour)."""
    return ARCHS.get(name) or int(re.sub(r"\D", "", name))


def ctas_per_sm(arch: int, registers: int, smem: int, threads: int) -> int:
    """Resident CTAs per SM: registers (allocated per warp in units of 256), shared memory (plus the 1 KiB the
    system reserves per CTA), threads, and the hardware cap."""
    lim = LIMITS[arch]
    warps = max(1, -(-threads // 32))
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (lim["regs_per_sm"] // regs_per_warp) // warps
    by_smem = lim["smem_per_sm"] // (smem + lim["smem_reserved_per_cta"]) if smem <= lim["smem_per_block"] else 0
    by_threads = lim["threads_per_sm"] // (warps * 32)
    return max(0, min(by_regs, by_smem, by_threads, lim["ctas_per_sm"]))


def run_cuobjdump(flag: str, path: str) -> str:
    res = subprocess.run([cuobjdump(), flag, path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump {flag} {path} failed: {res.stderr.strip()[:500]}")
    return res.stdout


# ---- Triton: record what the launchers launch --------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    """One kernel launch as the JIT would compile it: enough to rebuild an ASTSource in another process."""
    module: str
    name: str
    args: dict          # parameter name -> ("tensor", dtype) | ("tensors", dtypes) | ("const" or "value", value)
    options: dict       # num_warps, num_stages, ...
    dtype: str          # the activation dtype of the launcher call that made it
    shape: str          # "T=..,d=..,h=..,E=.." of that call


class _Recorder:
    """Stands in for a JITFunction in a launcher module: ``kernel[grid](*args, **kw)`` is recorded."""

    def __init__(self, fn, sink, context):
        self.fn, self.sink, self.context = fn, sink, context
        self.constexprs = {p.name for p in fn.params if p.is_constexpr}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            import torch
            options = {k: kwargs.pop(k) for k in list(kwargs) if k not in self.fn.arg_names}
            bound = dict(zip(self.fn.arg_names, args))
            bound.update(kwargs)
            desc = {}
            for n, v in bound.items():
                if isinstance(v, torch.Tensor):
                    desc[n] = ("tensor", str(v.dtype).replace("torch.", ""))
                elif isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
                    desc[n] = ("tensors", [str(t.dtype).replace("torch.", "") for t in v])
                else:
                    desc[n] = ("const" if n in self.constexprs else "value", v)
            self.sink.append(Launch(self.fn.__module__, self.fn.__name__, desc, options, *self.context()))
        return launch

    def __getattr__(self, name):  # arg_names, params, ...
        return getattr(self.fn, name)


def _patch_kernels(sink, context):
    """Replace every JITFunction reachable from the launcher modules by a recorder; returns an undo."""
    import importlib
    import triton
    mods = [importlib.import_module(f"moebert_kernels.triton.{m.stem}")
            for m in sorted((ROOT / "moebert_kernels" / "triton").glob("*.py")) if m.stem != "__init__"]
    saved = []
    for mod in mods:
        for attr, val in list(vars(mod).items()):
            fn = val.fn if isinstance(val, _Recorder) else val
            if isinstance(fn, triton.runtime.JITFunction):
                saved.append((mod, attr, val))
                setattr(mod, attr, _Recorder(fn, sink, context))

    if not saved:
        raise RuntimeError("kernel_report: no Triton JIT kernels to record (TRITON_INTERPRET=1 makes interpreter "
                           "objects of them): run it in a process without TRITON_INTERPRET")

    def undo():
        for mod, attr, val in saved:
            setattr(mod, attr, val)
    return undo


@dataclasses.dataclass
class Tuned:
    """One tuned config found in a configs/*.json file."""
    kind: str                 # a kind of moe_ffn.override_config: "gemm", "dw" (and "hidden" where it exists)
    fields: dict              # block_m, block_n, block_k, num_warps, num_stages, ...
    bucket: int | None        # the token bucket it is for
    dtype: str | None         # "bfloat16", ... when the file says
    shape: tuple | None       # (d, h, E) when the file name says (d=..,h=..,E=..)


def tuned_configs(folder: Path | None = None) -> list[Tuned]:
    """Every tuned config in ``folder`` (default: ``$MOEBERT_TRITON_CONFIG_DIR``, then
    ``moebert_kernels/triton/configs``), read from the JSON files themselves so that any layout works: an
    object holding block sizes is a config; its kind is the nearest enclosing key that names one of
    ``override_config``'s kinds (``up``/``down``/``bwd``/``dx`` count as "gemm"; none: "gemm"), its bucket the
    nearest numeric key, its dtype the nearest key that is a dtype name, its shape from the file name."""
    from moebert_kernels.triton import moe_ffn as tm
    kinds = [k for k in inspect.signature(tm.override_config).parameters]
    folders = [Path(folder)] if folder is not None else (
        [Path(os.environ["MOEBERT_TRITON_CONFIG_DIR"])] if os.environ.get("MOEBERT_TRITON_CONFIG_DIR") else []) + [
        ROOT / "moebert_kernels" / "triton" / "configs"]
    found = []

    def kind_of(path):
        for p in reversed(path):
            low = p.lower()
            hit = next((k for k in kinds if low.startswith(k)), None)
            if hit or low.startswith(("up", "down", "bwd", "dx", "dh")):
                return hit or "gemm"
        return "gemm"

    def walk(node, path, shape):
        if isinstance(node, dict):
            low = {str(k).lower(): v for k, v in node.items()}
            if all(k in low for k in ("block_m", "block_n", "block_k")):
                found.append(Tuned(kind_of(path), low, next((int(p) for p in reversed(path) if p.isdigit()), None),
                                   next((p for p in reversed(path) if p in DTYPES.values()), None), shape))
                return
            for k, v in node.items():
                walk(v, path + [str(k)], shape)
        elif isinstance(node, list):
            for v in node:
                walk(v, path, shape)
    for f in sorted({f for d in folders for f in glob.glob(str(d / "*.json"))}):
        m = re.search(r"d=(\d+),h=(\d+),E=(\d+)", Path(f).name)
        walk(json.loads(Path(f).read_text()), [], tuple(int(v) for v in m.groups()) if m else None)
    return found


def record_launches(dtypes, buckets=BUCKETS, shapes=SHAPES, config_dir=None) -> list[Launch]:
    """Every launch the Triton launchers make over ``dtypes`` x ``buckets`` x ``shapes`` (plus tuned configs,
    from ``config_dir`` if given)."""
    import torch
    from moebert_kernels.triton import distill_loss as dl, expert_layer_norm as eln, moe_ffn as tm

    sink, ctx = [], {"dtype": "", "shape": ""}
    undo = _patch_kernels(sink, lambda: (ctx["dtype"], ctx["shape"]))
    meta = torch.device("meta")

    def moe(T, d, h, E, dt, gated=False, bias=True):
        ctx.update(dtype=str(dt).replace("torch.", ""), shape=f"T={T},d={d},h={h},E={E}")
        h_up = 2 * h if gated else h
        x = torch.empty(T, d, dtype=dt, device=meta)
        tok = torch.empty(T, dtype=torch.int64, device=meta)
        off = torch.empty(E + 1, dtype=torch.int64, device=meta)
        w1, w2 = torch.empty(E, h_up, d, dtype=dt, device=meta), torch.empty(E, d, h, dtype=dt, device=meta)
        b1 = torch.empty(E, h_up, dtype=dt, device=meta) if bias else None
        b2 = torch.empty(E, d, dtype=dt, device=meta) if bias else None
        gate = torch.empty(T, dtype=dt, device=meta)
        act = "geglu" if gated else "gelu"
        _, hidden = tm.moe_ffn_forward(x, tok, off, w1, b1, w2, b2, gate, act, True)
        tm.moe_ffn_backward(x, x, tok, off, w1, b1, w2, b2, gate, hidden, act, (True,) * 6)

    try:
        for dtype in dtypes:
            dt = getattr(torch, DTYPES[dtype])
            for d, h, E in shapes:
                for T in buckets:
                    moe(T, d, h, E, dt)
            for T in buckets:  # gated experts (ModernBERT's GeGLU, no biases) at the benchmark's size
                moe(T, 768, 768, 4, dt, gated=True, bias=False)
            names = {f.name for f in dataclasses.fields(tm.MoEFFNConfig)}
            for tuned in tuned_configs(config_dir):
                if tuned.dtype not in (None, str(dt).replace("torch.", "")):
                    continue
                cfg = tm.MoEFFNConfig(**{k: v for k, v in tuned.fields.items() if k in names})
                with tm.override_config(**{tuned.kind: cfg}):
                    for d, h, E in [tuned.shape] if tuned.shape else shapes[:2]:
                        moe(tuned.bucket or 4096, d, h, E, dt)
            # The other kernel families at BERT sizes: one launch shape each (their tiles follow d and C).
            ctx.update(dtype=str(dt).replace("torch.", ""), shape="B=32,S=128,d=768,L=12,C=2")
            hs = [torch.empty(32, 128, 768, dtype=dt, device=meta) for _ in range(12)]
            mask = torch.empty(32 * 128, dtype=torch.float32, device=meta)
            inv = torch.empty(1, dtype=torch.float32, device=meta)
            dl.distill_hidden_forward(hs, hs, [1.0] * 12, mask, inv, True)
            for C in (2, 30522):
                ctx.update(shape=f"B=32,C={C}")
                lg = [torch.empty(32, C, dtype=dt, device=meta)]
                dl.distill_logits_forward(lg, lg, torch.empty(1, 32, dtype=torch.int64, device=meta),
                                          inv, inv, 1, 1.0, 1.0, 1.0, True)
            ctx.update(shape="T=4096,d=768,E=4")
            x = torch.empty(4096, 768, dtype=dt, device=meta)
            ids = torch.empty(4096, dtype=torch.int64, device=meta)
            w = torch.empty(4, 768, dtype=dt, device=meta)
            y, mean, rstd = eln.expert_layer_norm_forward(x, x, ids, w, w, 1e-12)
            eln.expert_layer_norm_backward(y, x, x, ids, w, mean, rstd, (True, True, True))
    finally:
        undo()
    return sink


# ---- Triton: compile one specialised launch ----------------------------------------------------------------

def _specialise(fn, launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT derives them for this launch."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    class FakePtr:  # what the binder reads from a tensor: its dtype and a 16-byte aligned address
        def __init__(self, dtype):
            self.dtype = getattr(torch, dtype)

        def data_ptr(self):
            return 0

    args = {}
    for n, (kind, v) in launch.args.items():
        args[n] = FakePtr(v) if kind == "tensor" else tuple(FakePtr(t) for t in v) if kind == "tensors" else v
    from triton import knobs
    kwargs = dict(launch.options)  # what JITFunction.run adds before it parses the options (3.6 and 3.9)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def _config_and_variant(launch: Launch) -> tuple[str, str]:
    """A short config string (tile sizes, warps, stages) and the other constexprs (true flags and codes)."""
    vals = {n: v for n, (k, v) in launch.args.items() if k == "const"}
    tile = {n: v for n, v in vals.items() if n.startswith("BLOCK") or n == "ROWS"}
    tiles = [f"{n.removeprefix('BLOCK_')}{v}" for n, v in tile.items()]
    tiles += [f"{k.removeprefix('num_')[0]}{v}" for k, v in sorted(launch.options.items(), reverse=True)
              if k in ("num_warps", "num_stages")]
    flags = [n for n, v in vals.items() if n not in tile and v is True and n != "UPCAST"]
    codes = [f"{n}={v}" for n, v in vals.items() if n not in tile and not isinstance(v, bool) and v is not None]
    return " ".join(tiles), " ".join(flags + codes)


def compile_launch(job) -> dict:
    """Compile one launch for one arch and read its cubin; runs in a worker process."""
    launch, arch_name = job
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    arch = ARCHS[arch_name]
    fn = getattr(importlib.import_module(launch.module), launch.name)
    fn = fn.fn if isinstance(fn, _Recorder) else fn
    options, signature, constexprs, attrs = _specialise(fn, launch, arch)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(kernel.asm["cubin"])
        usage = parse_resource_usage(run_cuobjdump("--dump-resource-usage", str(cubin)))
        sass = parse_sass(run_cuobjdump("-sass", str(cubin)))
    (_, sym), res = next(iter(usage.items()))
    counts = next(iter(sass.values()))
    threads = kernel.metadata.num_warps * 32
    smem = max(kernel.metadata.shared, res.get("SHARED", 0))
    config, variant = _config_and_variant(launch)
    return dict(kernel=launch.name.removeprefix("_").removesuffix("_kernel"), backend="triton", arch=arch_name,
                dtype=launch.dtype, config=config, variant=variant, registers=res["REG"],
                spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0), smem_bytes=smem,
                ctas_per_sm=ctas_per_sm(arch, res["REG"], smem, threads), threads=threads,
                gemm="tt.dot" in kernel.asm["ttir"], shapes=[launch.shape], **counts)


def _launch_key(launch: Launch) -> str:
    """Two launches compile to the same kernel when the JIT specialises them the same way."""
    import importlib
    fn = getattr(importlib.import_module(launch.module), launch.name)
    fn = fn.fn if isinstance(fn, _Recorder) else fn
    options, signature, constexprs, attrs = _specialise(fn, launch, 90)
    return json.dumps([launch.module, launch.name, signature, sorted(constexprs.items()), sorted(attrs.items()),
                       options.num_warps, options.num_stages], default=str)


def _compile_only(job) -> str:
    """Compile one launch for one arch, nothing else (the warm-up: it fills Triton's on-disk cache)."""
    launch, arch_name = job
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    fn = getattr(importlib.import_module(launch.module), launch.name)
    fn = fn.fn if isinstance(fn, _Recorder) else fn
    options, signature, constexprs, attrs = _specialise(fn, launch, arch_number(arch_name))
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    triton.compile(src, target=GPUTarget("cuda", arch_number(arch_name), 32), options=options.__dict__)
    return launch.name


def warm_up(dtypes, arch_name, jobs) -> int:
    """Compile every launch for this machine's GPU in a pool of processes, so the JIT of later processes finds
    each kernel in Triton's cache instead of compiling it serially. Returns the number of kernels."""
    unique = {}
    for ln in record_launches(dtypes):
        unique.setdefault(_launch_key(ln), ln)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(_compile_only, [(ln, arch_name) for ln in unique.values()]))
    return len(done)


def native_arch() -> str:
    """This machine's GPU as a report arch (sm_90 -> sm_90a, as Triton compiles it). Asked of nvidia-smi, or of
    torch in a child process: CUDA initialised here would be inherited by the forked compile workers."""
    try:
        cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout.split()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        cap = subprocess.run([sys.executable, "-c", "import torch; print('%d.%d' % torch.cuda.get_device_capability()"
                              " if torch.cuda.is_available() else '')"], capture_output=True, text=True,
                             timeout=120).stdout.strip()
    if not re.fullmatch(r"\d+\.\d+", cap):
        raise SystemExit("kernel_report --warmup: no GPU here (it compiles for this machine's GPU)")
    major, minor = cap.split(".")
    return f"sm_{major}{minor}" + ("a" if major == "9" else "")


def triton_rows(dtypes, archs, jobs) -> list[dict]:
    launches = record_launches(dtypes)
    unique: dict[str, Launch] = {}
    shapes: dict[str, list] = {}
    for ln in launches:
        k = _launch_key(ln)
        unique.setdefault(k, ln)
        if ln.shape not in shapes.setdefault(k, []):
            shapes[k].append(ln.shape)
    todo = [(k, ln, a) for k, ln in unique.items() for a in archs]
    # Biggest tiles first: they take longest to compile, so the pool's tail is short.
    todo.sort(key=lambda t: -sum(v for n, (kd, v) in t[1].args.items() if n.startswith("BLOCK") and kd == "const"
                                 and isinstance(v, int)))
    rows = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for (k, _, _), row in zip(todo, pool.map(compile_launch, [(ln, a) for _, ln, a in todo])):
            row["shapes"] = shapes[k]
            rows.append(row)
    return rows


# ---- CUDA C++ ----------------------------------------------------------------------------------------------

def find_cuda_so() -> str | None:
    found = sorted(glob.glob(str(ROOT / "moebert_kernels" / "_C*.so")))
    return found[0] if found else None


def demangle(symbols) -> dict:
    symbols = list(symbols)
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not symbols:
        return {s: s for s in symbols}
    res = subprocess.run([tool], input="\n".join(symbols), capture_output=True, text=True)
    names = res.stdout.splitlines() if res.returncode == 0 else symbols
    return dict(zip(symbols, names if len(names) == len(symbols) else symbols))


def _top_level(demangled: str) -> tuple[str, str]:
    """(qualified function name, its first template argument) of a demangled kernel name; "" where absent."""
    depth, out, first, in_first = 0, [], [], True
    for ch in demangled.replace("(anonymous namespace)", "anon"):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
            in_first = in_first and depth > 0
        elif ch == "(" and depth == 0:
            break
        elif depth == 0:
            out.append(ch)
        elif depth == 1 and ch == ",":
            in_first = False
        if depth >= 1 and in_first and not (depth == 1 and ch == "<"):
            first.append(ch)
    words = "".join(out).split()
    return (words[-1] if words else ""), "".join(first).strip()


def short_name(demangled: str) -> str:
    """The function name without its namespace, template arguments and parameters (CUTLASS names run long)."""
    name = _top_level(demangled)[0] or demangled
    return name.split("::")[-1] or demangled[:60]


# CUTLASS launches every kernel through a generic __global__ wrapper; its first template argument is the
# kernel proper (cutlass::gemm::kernel::GemmUniversal<...>), so that argument's own name is what says GEMM.
CUTLASS_WRAPPERS = ("cutlass::device_kernel", "cutlass::Kernel", "cutlass::Kernel2")


def named_gemm(demangled: str) -> bool:
    """Whether the kernel's own name says GEMM: not its template arguments, where ``_sm90_args_kernel<Sm90Gemm<..>>``
    (the device-side argument builder, no tensor cores by design) names the GEMM it prepares for."""
    name, first = _top_level(demangled)
    if name in CUTLASS_WRAPPERS:
        name = _top_level(first)[0]
    return "gemm" in name.split("::")[-1].lower() or name.startswith("cutlass::gemm::")


def cuda_rows(so_path: str, archs) -> list[dict]:
    usage = parse_resource_usage(run_cuobjdump("--dump-resource-usage", so_path))
    sass = parse_sass(run_cuobjdump("-sass", so_path))
    names = demangle({sym for _, sym in usage})
    rows = []
    wanted = {arch_number(a) for a in archs}
    for (arch_name, sym), res in sorted(usage.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if arch_name is None or arch_number(arch_name) not in wanted:
            continue
        counts = sass.get((arch_name, sym), {k: 0 for k in SASS_COUNTS})
        full = names.get(sym, sym)
        short = short_name(full)
        dtype = next((dt for tag, dt in (("__nv_bfloat16", "bfloat16"), ("__half", "float16"), ("<float>", "float32"),
                                         ("<float,", "float32")) if tag in full), "")
        rows.append(dict(
            kernel=short, backend="cuda", arch=arch_name, dtype=dtype,
            config=hashlib.sha1(sym.encode()).hexdigest()[:8],  # one template instance: its symbol's hash
            variant=full[:300], registers=res["REG"], spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0),
            smem_bytes=res.get("SHARED", 0), ctas_per_sm=None, threads=None,
            gemm=bool(counts["hgmma"] or counts["hmma"]) or named_gemm(full), shapes=[], symbol=sym, **counts))
    return rows


# ---- checks and output -------------------------------------------------------------------------------------

def row_id(row: dict) -> str:
    """What a known violation is keyed by: kernel, arch, dtype and config (all variants of that config)."""
    return "|".join([row["backend"], row["kernel"], row["arch"], row["dtype"], row["config"]])


def violations(rows, rules=RULES) -> list[tuple[str, str]]:
    """``[(row_id, what is wrong)]``: the rules CI enforces (see the module docstring), or only ``rules``."""
    out = []
    for r in rows:
        arch = arch_number(r["arch"])
        what = []
        if "spill" in rules and r["gemm"] and r["spill_bytes"] > 0:
            what.append(f"GEMM spills {r['spill_bytes']} B ({r['local_loads']} LDL, {r['local_stores']} STL)")
        sixteen_bit = r["dtype"] in ("bfloat16", "float16") or (r["backend"] != "triton" and not r["dtype"])
        if "hgmma" in rules and r["gemm"] and arch == 90 and sixteen_bit and r["hgmma"] == 0:
            what.append("sm_90 GEMM without HGMMA (wgmma)")
        if "smem" in rules and r["smem_bytes"] > LIMITS[arch]["smem_per_block"]:
            what.append(f"shared memory {r['smem_bytes']} B over the {r['arch']} limit of "
                        f"{LIMITS[arch]['smem_per_block']} B per block")
        if "fit" in rules and r["ctas_per_sm"] == 0:
            what.append("not even one CTA fits on an SM")
        out += [(row_id(r), f"{w} [{r['variant']}]") for w in what]
    return out


def table(rows) -> str:
    head = ["kernel", "backend", "arch", "dtype", "config", "regs", "spill B", "smem B", "CTAs/SM", "HGMMA", "HMMA",
            "TMA ld", "cp.async", "variant"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["kernel"], r["backend"], r["arch"], r["dtype"], r["config"], r["registers"], r["spill_bytes"],
                 r["smem_bytes"], "" if r["ctas_per_sm"] is None else r["ctas_per_sm"], r["hgmma"], r["hmma"],
                 r["tma_loads"], r["cp_async"], r["variant"][:80]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows to this file (written whole, then moved into place)")
    ap.add_argument("--arch", default="sm_90a,sm_80", help="comma-separated: sm_90a, sm_80")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated: bf16, fp16, fp32")
    ap.add_argument("--cuda-so", help="the CUDA C++ extension to read (default: moebert_kernels/_C*.so if built)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ extension")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    ap.add_argument("--check", nargs="?", const=",".join(RULES), default=None, metavar="RULES",
                    help=f"exit 1 on a violation of these rules (comma-separated, default all: {','.join(RULES)})")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--known", action="store_true",
                    help="also print the violations as KNOWN_VIOLATIONS entries (tests/test_kernel_report.py)")
    ap.add_argument("--warmup", action="store_true",
                    help="only compile every launch for this machine's GPU (fills Triton's cache; no report)")
    args = ap.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_report: run it in a process without TRITON_INTERPRET=1 (its kernels cannot compile)")
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter's triton.jit objects cannot be compiled
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's default-change warning
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    rules = tuple(args.check.split(",")) if args.check else RULES
    bad = ([a for a in archs if a not in ARCHS] + [d for d in args.dtypes.split(",") if d not in DTYPES]
           + [r for r in rules if r not in RULES])
    if bad:
        ap.error(f"unknown arch/dtype/rule {bad}: archs are {list(ARCHS)}, dtypes {list(DTYPES)}, rules {RULES}")
    if args.warmup:
        import time
        t0, arch = time.time(), native_arch()
        n = warm_up(args.dtypes.split(","), arch, max(1, args.jobs))
        print(f"kernel_report --warmup: compiled {n} Triton kernels for {arch} in {time.time() - t0:.0f} s "
              f"with {args.jobs} processes")
        return 0
    rows = []
    if not args.no_triton:
        rows += triton_rows(args.dtypes.split(","), archs, max(1, args.jobs))
    so = None if args.no_cuda else (args.cuda_so or find_cuda_so())
    if args.cuda_so and not Path(args.cuda_so).exists():
        ap.error(f"--cuda-so {args.cuda_so}: no such file (build it with MOEBERT_BUILD_CUDA=1 pip install -e .)")
    if so:
        rows += cuda_rows(so, archs)
    elif not args.no_cuda:
        print("kernel_report: no CUDA C++ extension (moebert_kernels/_C*.so) found; pass --cuda-so PATH",
              file=sys.stderr)
    rows.sort(key=lambda r: (r["backend"], r["kernel"], r["arch"], r["dtype"], r["config"], r["variant"]))
    print(table(rows))
    if args.json:
        tmp = Path(args.json + ".part")
        tmp.write_text(json.dumps(rows, indent=1, default=str))
        tmp.replace(args.json)
    found = violations(rows, rules)
    for key, what in found:
        print(f"VIOLATION {key}: {what}")
    if args.known:  # one entry per key, the first reason for it (the test keys on kernel, arch, dtype, config)
        print("KNOWN_VIOLATIONS = {")
        for key in dict.fromkeys(k for k, _ in found):
            print(f"    {key!r}: {next(w for k, w in found if k == key).split(' [')[0]!r},")
        print("}")
    print(f"kernel_report: {len(rows)} rows, {len(found)} violations")
    return 1 if (args.check is not None and found) else 0


if __name__ == "__main__":
    sys.exit(main())
