"""The one place where a backend is chosen.

Order on CUDA tensors when nothing is forced: ``AUTO_ORDER`` (see there for why Triton
currently leads), ending in ``torch`` (the reference). CPU tensors default to ``torch``; the
Triton interpreter (``TRITON_INTERPRET=1``) is only used on CPU when forced, because
it is a correctness tool, not a fast path.

Force a backend with ``backend=`` on any op or ``MOEBERT_BACKEND=<name>`` in the
environment. A forced backend that cannot run raises :class:`BackendUnavailableError`
with the reason; it never falls back silently.

A call may need optional features of an op (``needs=``, e.g. a shared expert or a gated
activation). Each backend declares what it implements when it is registered
(``register_impl(..., features=...)``); automatic selection skips a backend that lacks a
needed feature, and forcing it raises with the missing feature named.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from typing import Optional

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "add_features",
    "get_impl",
    "register_impl",
    "select_backend",
]

BACKENDS = ("cuda", "triton", "torch")
# The design order is cuda -> triton -> torch. The CUDA C++ kernels have so far only been
# compiled, never run on a GPU, while the Triton kernels are checked against the reference
# under the interpreter; so Triton leads until the GPU test suite has passed on hardware.
AUTO_ORDER = ("triton", "cuda", "torch")
ENV_VAR = "MOEBERT_BACKEND"

# (op, backend) -> module path exposing that op's `<op>_forward` / `<op>_backward`.
_IMPLS: dict[tuple[str, str], str] = {}
# (op, backend) -> the optional features that backend implements.
_FEATURES: dict[tuple[str, str], frozenset[str]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was forced but cannot run here; the message says why."""


def register_impl(op: str, backend: str, module_path: str, features: tuple[str, ...] = ()) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS[(op, backend)] = module_path
    _FEATURES[(op, backend)] = frozenset(features)


def add_features(op: str, backend: str, features: tuple[str, ...]) -> None:
    """Declare more optional features of an already registered backend."""
    if (op, backend) not in _IMPLS:
        raise ValueError(f"op {op!r} has no {backend!r} implementation registered")
    _FEATURES[(op, backend)] = _FEATURES[(op, backend)] | frozenset(features)


@lru_cache(maxsize=None)
def _import_impl(module_path: str):
    return importlib.import_module(module_path)


def get_impl(op: str, backend: str):
    """The module that implements ``op`` on ``backend``."""
    try:
        path = _IMPLS[(op, backend)]
    except KeyError:
        raise BackendUnavailableError(f"op {op!r} has no {backend!r} implementation") from None
    return _import_impl(path)


@lru_cache(maxsize=None)
def _module_exists(module_path: str) -> bool:
    try:
        return importlib.util.find_spec(module_path) is not None
    except ImportError:
        return False


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def backend_status(op: str, backend: str, device: torch.device, needs: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on ``device`` with the optional features ``needs``, and if not, why."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    missing = sorted(set(needs) - _FEATURES.get((op, backend), frozenset()))
    if (op, backend) in _IMPLS and missing:
        return False, f"the {backend} backend of {op} does not implement {', '.join(missing)}"
    if backend == "torch":
        return (True, "") if (op, backend) in _IMPLS else (False, f"op {op!r} has no 'torch' implementation")
    if backend == "triton":
        if not (device.type == "cuda" or (device.type == "cpu" and _triton_interpret())):
            return False, (f"triton needs CUDA tensors (got {device.type}); "
                           "set TRITON_INTERPRET=1 to run its kernels on CPU tensors")
        err = _triton_import_error()
        if err:
            return False, err
    elif device.type != "cuda":
        return False, f"the cuda backend needs CUDA tensors (got {device.type})"
    if (op, backend) not in _IMPLS or not _module_exists(_IMPLS[(op, backend)]):
        return False, f"op {op!r} has no {backend!r} implementation yet"
    if backend == "cuda":
        from .. import _cuda

        ext, why = _cuda.load()
        if ext is None:
            return False, why
    return True, ""


def available_backends(op: str, device: torch.device | str, needs: tuple[str, ...] = ()) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if backend_status(op, b, device, needs)[0]]


def select_backend(op: str, device: torch.device | str, backend: Optional[str] = None,
                   needs: tuple[str, ...] = ()) -> str:
    """Pick the backend for one call of ``op`` on tensors living on ``device`` that needs the
    optional features ``needs``."""
    device = torch.device(device)
    forced = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if forced is not None:
        forced = forced.lower()
        if forced not in BACKENDS:
            src = "backend=" if backend is not None else f"${ENV_VAR}"
            raise ValueError(f"{src} got {forced!r}; expected one of {BACKENDS}")
        ok, why = backend_status(op, forced, device, needs)
        if not ok:
            raise BackendUnavailableError(f"backend {forced!r} was forced for {op} but cannot run: {why}")
        return forced
    if device.type == "cuda":
        for cand in AUTO_ORDER:
            if backend_status(op, cand, device, needs)[0]:
                return cand
    ok, why = backend_status(op, "torch", device, needs)
    if not ok:
        raise BackendUnavailableError(f"no backend can run {op} here: {why}")
    return "torch"
