"""Compile Triton kernels for sm_80 and sm_90 with no GPU: catches what the interpreter cannot
(typing, layouts, shared memory, constexpr branches the JIT would specialise).

The compile runs in a fresh interpreter: with TRITON_INTERPRET=1 set at import (tests/conftest.py does on
CPU), triton.jit hands back interpreter objects.
"""
import os
import subprocess
import sys

PRELUDE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(kernel, types, consts, num_warps, arch, num_stages=3, **options):
    sig, attrs = {}, {}
    for i, n in enumerate(kernel.arg_names):
        sig[n] = "constexpr" if n in consts else types[n]
        if isinstance(sig[n], tuple):  # a tuple argument: its elements are indexed (i, j)
            attrs.update({(i, j): [["tt.divisibility", 16]] for j, t in enumerate(sig[n]) if t.startswith("*")})
        elif sig[n].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, **options))
"""


def have_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    return True


def run(body: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``PRELUDE + body`` (which may call ``build``) in a fresh interpreter without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's default-change warning
    return subprocess.run([sys.executable, "-c", PRELUDE + body], env=env, capture_output=True, text=True,
                          timeout=timeout)
