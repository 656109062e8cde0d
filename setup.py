"""Build script: a pure-Python package, plus the CUDA extension moebert_kernels._C when possible.

MOEBERT_BUILD_CUDA=auto (default) builds _C when torch is a CUDA build and nvcc is found,
otherwise prints one line and skips; =1 forces the build (and fails loudly); =0 skips it.
TORCH_CUDA_ARCH_LIST is honoured (default here: "8.0;9.0a": the sm_90a pass holds the CUTLASS 3.x
Hopper GEMMs, the sm_80 pass the CUTLASS 2.x ones).

The CUTLASS headers come from the pinned ``nvidia-cutlass`` wheel (a build requirement, found
through its package path: ``cutlass_library/source/include``); ``MOEBERT_CUTLASS_DIR`` points
at another copy holding ``include/``; last, ``carry/cutlass`` (what scripts/pack_gpu_carry.sh
writes for a GPU machine with no registry).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("MOEBERT_BUILD_CUDA", "auto").lower()


CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"


def cutlass_include_dirs():
    """The CUTLASS/CuTe include folders, or None when the headers are not installed."""
    root = os.environ.get("MOEBERT_CUTLASS_DIR")
    if not root:
        try:
            import cutlass_library
        except ImportError:
            root = os.path.join(ROOT, "carry", "cutlass")
        else:
            root = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    if not os.path.exists(os.path.join(dirs[0], "cutlass", "cutlass.h")):
        return None
    return [d for d in dirs if os.path.isdir(d)]


def _cuda_extension():
    if MODE in ("0", "false", "no", "off"):
        print("moebert-kernels: MOEBERT_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    why = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        why = "torch is not importable at build time (install torch first and use --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None:
            why = "no CUDA toolkit found (set CUDA_HOME)"
        elif not sources:
            why = "csrc/ holds no sources"
        elif cutlass_include_dirs() is None:
            why = (f"the CUTLASS headers are missing (pip install {CUTLASS_PIN}, "
                   "or set MOEBERT_CUTLASS_DIR to a folder holding include/cutlass)")
    if why is not None:
        if MODE in ("1", "true", "yes", "on"):
            raise RuntimeError(f"MOEBERT_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        print(f"moebert-kernels: skipping the CUDA extension: {why}", file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    # Recorded in _C so the loader can refuse a GPU the build has no code for (';' would end
    # the shell command ninja runs, hence ',').
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", ",").replace(" ", ",")
    # The Hopper GEMMs (wgmma, TMA) exist only for sm_90a; without it the sm_80 GEMMs serve every GPU.
    sm90a = ["-DMOEBERT_HAS_SM90A"] if "9.0a" in archs.split(",") else []
    ext = CUDAExtension(
        name="moebert_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), *cutlass_include_dirs()],
        extra_compile_args={
            "cxx": ["-O3", f"-DMOEBERT_CUDA_ARCHS={archs}", *sm90a],
            # NDEBUG: CUTLASS's device asserts are calls, and a call inside the wgmma pipeline
            # serializes it (ptxas C7510).
            "nvcc": ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo", *sm90a],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="moebert-kernels",
    version="0.1.0",
    description="Fused top-1 MoE FFN and distillation-loss kernels (Triton + CUDA C++) for MoEBERT",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["moebert_kernels", "moebert_kernels.*"])
    + ["moebert"] + ["moebert." + p for p in find_packages("python/moebert")],
    package_dir={"moebert": "python/moebert"},
    package_data={"moebert_kernels": ["triton/configs/*.json"], "moebert": ["data/*"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.6; platform_system=='Linux'",
        "transformers>=4.50",
        "numpy",
        "safetensors",
        "tqdm",
        "accelerate>=0.26",
        "pybind11",
        "ninja",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "onnx", "onnxscript", "onnxruntime", "matplotlib"],
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "data": ["datasets"],
        "study": ["matplotlib"],
        # Headers only: `pip install --no-deps nvidia-cutlass==4.2.0.0` skips its Python deps.
        "cuda-build": [CUTLASS_PIN],
    },
    entry_points={"console_scripts": ["moebert=moebert.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
