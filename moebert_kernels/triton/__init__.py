"""Triton kernels, one family per file. Importing this package does not import triton."""
import functools

import torch


def on_input_device(fn):
    """Run a launcher with its first tensor's CUDA device current.

    Triton launches on the current device and its stream, so tensors on ``cuda:1`` while ``cuda:0`` is
    current would be read from the wrong device (the CUDA C++ side uses ``CUDAGuard`` for the same reason).
    The first argument is a tensor or a list of tensors.
    """
    @functools.wraps(fn)
    def launcher(first, *args, **kwargs):
        t = first[0] if isinstance(first, (list, tuple)) else first
        with torch.cuda.device(t.device if t.is_cuda else -1):  # -1: a no-op (CPU tensors, interpreter)
            return fn(first, *args, **kwargs)
    return launcher
