"""`python -m moebert_kernels`: which backend each op can use here, and why not."""
import torch

from . import __version__
from .ops.dispatch import BACKENDS, backend_status, select_backend


def report() -> str:
    lines = [f"moebert-kernels {__version__}, torch {torch.__version__}, CUDA build: {torch.version.cuda}, "
             f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in ("moe_ffn", "expert_layer_norm", "distill_loss"):
        for dev in devices:
            lines.append(f"{op} on {dev}: default backend {select_backend(op, dev)!r}")
            for b in BACKENDS:
                ok, why = backend_status(op, b, torch.device(dev))
                lines.append(f"  {b:6s} {'available' if ok else 'unavailable: ' + why}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
