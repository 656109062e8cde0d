"""Records every aten op (name, output shape) run under it: for tests that assert work is *not* done."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out
