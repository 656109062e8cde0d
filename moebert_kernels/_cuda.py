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
    return ext, ""


def extension_error() -> str:
    return load()[1]
