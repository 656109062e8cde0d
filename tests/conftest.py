import os

import torch

# Triton kernels run on CPU tensors through the interpreter; it must be on before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # A developer's MOEBERT_BACKEND must not change what the tests check.
    monkeypatch.delenv("MOEBERT_BACKEND", raising=False)


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is present")
