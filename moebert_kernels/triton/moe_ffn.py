"""Triton backend of ``moe_ffn``: fused gather-GEMM-scatter for top-1 routed expert FFNs.

Layout and math as in ``moebert_kernels.ops.moe_ffn``: x [T, d], w1 [E, h, d], b1 [E, h],
w2 [E, d_out, h], b2 [E, d_out], gate [T] or None;
y_t = g_t * (W2[e] act(W1[e] x_t + b1[e]) + b2[e]).

Forward (2 launches, nothing permuted in memory):
    up:   H[r] = x[sorted_token_ids[r]] W1[e]^T + b1[e]; A = act(H)   (rows gathered in the
          kernel; A, and H when saving, written in expert order [T, h])
    down: y[sorted_token_ids[r]] = g * (A[r] W2[e]^T + b2[e])         (plain scatter store:
          top-1 writes each token exactly once, so no atomics)
Backward (G = grad_out, token order):
    hidden: P = G[tok] W2[e] (gather); dH = g * P * act'(H); A = act(H) for dW2;
            dgate = rowsum(A * P) + G . b2  (== rowsum(G * (W2 a + b2)), no ungated output needed);
            db1 partials = column sums of the fp32 dH tile (so dW1's operands stay pure MMA inputs)
    dX:     dx[tok] = dH W1[e]  (the forward's down kernel with w1 read untransposed)
    dW:     dW1[e] = dH^T x[tok]; dW2[e] = (g G[tok])^T A, db2[e] = colsum g G[tok].
            Split-K over tokens: chunks of CHUNK rows inside one expert each write an fp32
            partial slab, then one reduce launch per weight sums an expert's chunks in a
            fixed order, so the result is deterministic (no float atomics).

Saved for backward: ``SAVES_HIDDEN = True``. The forward returns the GEMM1 pre-activation H
(expert order, input dtype) when ``save_hidden``; the backward derives both act(H) and
act'(H) from it in its first kernel's epilogue, so no GEMM is recomputed. Given an empty
``hidden`` the backward recomputes H with the up kernel (one extra GEMM).

Tile -> expert mapping needs no host sync: a grid of ``cdiv(T, BLOCK_M) + E`` row tiles
bounds the real ones, each program finds its expert by a prefix sum over
``expert_offsets`` in registers and surplus programs exit. Nothing here calls
``.item()``/``.tolist()``, so the path is CUDA-graph capturable.

Precision: every GEMM accumulates in fp32; outputs are in the input dtype (dW in the
weight dtype, dgate in the gate dtype). TF32 policy: fp32 inputs use
``input_precision="tf32"`` only when ``torch.backends.cuda.matmul.allow_tf32`` is True
(PyTorch's default is False), else ``"ieee"``, so fp32 matches the fp32 reference the
way cuBLAS would. ``input_precision=`` exists in Triton 3.0+ (3.6 and 3.9 both).
The saved H and the intermediate dH are stored in the input dtype (as autograd would).

Interpreter: under ``TRITON_INTERPRET=1`` ``tl.dot`` on bf16 inputs returns garbage
(Triton 3.9), so the launchers set ``UPCAST`` and the kernels cast dot operands to fp32
there. On a GPU ``UPCAST`` is False and bf16 goes to the tensor cores as is.

Configs: ``get_config(kind, T, d, h, E, dtype)`` keys on (kind, token bucket, d, h, E,
dtype) and returns a heuristic default (no autotuning at first call); under the
interpreter it returns tiny blocks. ``override_config`` swaps them in tests and
benchmarks. The defaults are not yet tuned on a GPU.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
from torch import Tensor

from . import on_input_device
from .moe_ffn_kernels import (
    ACT_GELU,
    ACT_GELU_TANH,
    ACT_RELU,
    _moe_ffn_bwd_hidden_kernel,
    _moe_ffn_down_kernel,
    _moe_ffn_dw_kernel,
    _moe_ffn_dw_reduce_kernel,
    _moe_ffn_up_kernel,
)

__all__ = ["SAVES_HIDDEN", "MoEFFNConfig", "get_config", "moe_ffn_forward", "moe_ffn_backward", "override_config"]

SAVES_HIDDEN = True

_ACT_CODES = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2
_REDUCE_BLOCK = 1024  # elements per reduce program: a streaming sum, 4 warps keep it bandwidth-bound


@dataclass(frozen=True)
class MoEFFNConfig:
    """Launch settings of one kernel kind.

    ``kind="gemm"`` (up, down, bwd hidden, dX): BLOCK_M rows x BLOCK_N columns, BLOCK_K deep.
    ``kind="dw"``: BLOCK_M x BLOCK_N of the weight gradient, BLOCK_K tokens per step,
    ``chunk`` tokens per split-K chunk (0: chosen from T and the GPU's SM count).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    chunk: int = 0

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {v}")
        if self.chunk and self.chunk % self.block_k:
            raise ValueError(f"chunk={self.chunk} must be a multiple of block_k={self.block_k}")


_OVERRIDES: dict[str, MoEFFNConfig] = {}


@contextlib.contextmanager
def override_config(gemm: Optional[MoEFFNConfig] = None, dw: Optional[MoEFFNConfig] = None):
    """Use these configs for every call inside the block (tests, benchmarks, tuning)."""
    saved = dict(_OVERRIDES)
    if gemm is not None:
        _OVERRIDES["gemm"] = gemm
    if dw is not None:
        _OVERRIDES["dw"] = dw
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_config(kind: str, T: int, d: int, h: int, E: int, dtype: torch.dtype) -> MoEFFNConfig:
    """The config for ``kind`` ("gemm" or "dw") at this problem size."""
    if kind not in ("gemm", "dw"):
        raise ValueError(f"kind must be 'gemm' or 'dw', got {kind!r}")
    if kind in _OVERRIDES:
        return _OVERRIDES[kind]
    bucket = 1 << max(4, min(16, (max(T, 1) - 1).bit_length()))  # 16 .. 65536 tokens
    return _default_config(kind, bucket, d, h, E, dtype, _interpreting())


@lru_cache(maxsize=None)
def _default_config(kind, bucket, d, h, E, dtype, interpret) -> MoEFFNConfig:
    if interpret:
        # Small tiles keep the CPU interpreter fast and make tiny test shapes span several tiles.
        return MoEFFNConfig(16, 32, 16, chunk=32 if kind == "dw" else 0)
    per_expert = bucket // E  # tokens per expert if the routing is balanced
    if kind == "gemm":
        if per_expert <= 32:  # weight-read bound: many thin programs stream the weights in parallel
            bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
        elif per_expert <= 64:
            bm, bn, bk, warps, stages = 32, 64, 128, 4, 4
        elif per_expert <= 256:
            bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
        elif per_expert <= 1024:
            bm, bn, bk, warps, stages = 64, 128, 64, 4, 4
        else:
            bm, bn, bk, warps, stages = 128, 128, 64, 8, 4
    else:
        if per_expert <= 256:
            bm, bn, bk, warps, stages = 64, 64, 32, 4, 4
        else:
            bm, bn, bk, warps, stages = 128, 128, 64, 8, 4
    if dtype == torch.float32:  # 4-byte operands: halve the depth so the stages fit in shared memory
        bk, stages = max(16, bk // 2), min(stages, 3)
    return MoEFFNConfig(bm, bn, bk, warps, stages)


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dw_chunk(T: int, M: int, N: int, cfg: MoEFFNConfig, device: torch.device) -> int:
    """Tokens per split-K chunk: enough programs for ~4 waves, at least 4 K-steps each."""
    if cfg.chunk:
        return cfg.chunk
    bk = cfg.block_k
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    chunk = max(triton.cdiv(T * tiles, 4 * sms), 4 * bk)
    chunk = triton.cdiv(chunk, bk) * bk
    return min(chunk, triton.cdiv(max(T, 1), bk) * bk)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit inputs; the default everywhere


def _empty(shape, dtype, device) -> Tensor:
    """Every buffer a kernel writes comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _common(x: Tensor, E: int):
    if x.dtype not in _DTYPES:
        raise TypeError(f"the triton moe_ffn supports {_DTYPES}, got {x.dtype}")
    return dict(
        E_POW2=max(2, triton.next_power_of_2(E)),
        UPCAST=_interpreting() and x.dtype == torch.bfloat16,
        PRECISION=_precision(x.dtype),
    )


def _launch_up(x, w1, b1, tok, offsets, act, hidden, activation, cfg, common):
    T, d = x.shape
    E, h, _ = w1.shape
    grid = ((triton.cdiv(T, cfg.block_m) + E) * triton.cdiv(h, cfg.block_n),)
    _moe_ffn_up_kernel[grid](
        x, w1, b1, tok, offsets,
        act if act is not None else x, hidden if hidden is not None else x,
        E, h, d, x.stride(0), w1.stride(0), w1.stride(1), w1.stride(2),
        ACTIVATION=_ACT_CODES[activation], STORE_ACT=act is not None, STORE_H=hidden is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=d % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )


def _launch_down(a, w, stride_w, bias, gate, tok, offsets, out, cfg, common):
    """out[tok[r]] = a[r] @ B_e (+ bias[e]) (* gate[tok[r]]), B_e[k, n] = w[e] at strides (k, n)."""
    T, K = a.shape
    N = out.shape[1]
    E = w.shape[0]
    grid = ((triton.cdiv(T, cfg.block_m) + E) * triton.cdiv(N, cfg.block_n),)
    _moe_ffn_down_kernel[grid](
        a, w, bias if bias is not None else a, gate if gate is not None else a, tok, offsets, out,
        E, N, K, a.stride(0), w.stride(0), stride_w[0], stride_w[1],
        HAS_BIAS=bias is not None, HAS_GATE=gate is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )


def _launch_dw(left, right, gate, tok, offsets, l_gather, r_gather, want_w, want_b, E, dw, db, cfg, common,
               db_part=None, db_chunk=0):
    """dw[e] = sum_r L[r]^T R[r], db[e] = sum_r L[r] over expert e's rows (L gate-scaled if gate).

    ``db_part``/``db_chunk``: db partials computed elsewhere, one row per ``db_chunk``
    expert-ordered rows; then the dW kernel skips its column sums.
    """
    T, M = left.shape
    N = right.shape[1]
    chunk = _dw_chunk(T, M, N, cfg, left.device)
    if not cfg.chunk and triton.cdiv(T, chunk) + E > _MAX_GRID_Y:
        # Chunks are grid axis 1, which CUDA caps at 65535 (the interpreter does not): widen them.
        chunk = triton.cdiv(triton.cdiv(T, _MAX_GRID_Y - E), cfg.block_k) * cfg.block_k
    n_chunks = triton.cdiv(T, chunk) + E  # each expert adds at most one partial chunk
    if n_chunks > _MAX_GRID_Y:
        raise ValueError(f"dw config chunk={chunk} makes {n_chunks} split-K chunks at T={T}, E={E}; CUDA allows "
                         f"{_MAX_GRID_Y} on grid axis 1: use a larger chunk (or 0 for automatic)")
    kernel_b = want_b and db_part is None
    pw = _empty((n_chunks, M, N), torch.float32, left.device) if want_w else None
    if kernel_b:
        db_part, db_chunk = _empty((n_chunks, M), torch.float32, left.device), chunk
    if want_w or kernel_b:
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), n_chunks)
        _moe_ffn_dw_kernel[grid](
            left, right, gate if gate is not None else left, tok, offsets,
            pw if want_w else db_part, db_part if want_b else pw,
            E, M, N, left.stride(0), right.stride(0), chunk,
            L_GATHER=l_gather, L_GATE=gate is not None, R_GATHER=r_gather, LOAD_TOK=l_gather or r_gather,
            COMPUTE_W=want_w, COMPUTE_B=kernel_b,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            E_POW2=common["E_POW2"], UPCAST=common["UPCAST"], PRECISION=common["PRECISION"],
        )
    mn, mb = (M * N if want_w else 0), (M if want_b else 0)
    _moe_ffn_dw_reduce_kernel[(triton.cdiv(mn + mb, _REDUCE_BLOCK), E)](
        pw if want_w else db_part, db_part if want_b else pw, dw, db, offsets, E, mn, mb, chunk,
        db_chunk if want_b else chunk, E_POW2=common["E_POW2"], BLOCK=_REDUCE_BLOCK, num_warps=4,
    )


def _contiguous_inputs(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation):
    """Check the activation and make every operand contiguous (no copy when it already is).

    The kernels index the plan with unit stride; a strided plan (a column of a [T, L] tensor)
    would otherwise be misread.
    """
    if activation not in _ACT_CODES:
        raise ValueError(f"activation must be one of {tuple(_ACT_CODES)}, got {activation!r}")
    tensors = (x, sorted_token_ids, expert_offsets, w1, b1, w2, b2)
    return (*(t.contiguous() for t in tensors), gate.contiguous() if gate is not None else None)


@on_input_device
def moe_ffn_forward(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, save_hidden):
    """Backend contract: ``(out [T, d_out], hidden [T, h] expert order or empty)``."""
    x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate = _contiguous_inputs(
        x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation)
    T, d = x.shape
    E, h, _ = w1.shape
    d_out = w2.shape[1]
    common = _common(x, E)
    out = _empty((T, d_out), x.dtype, x.device)
    hidden = _empty((T, h), x.dtype, x.device) if save_hidden else x.new_empty(0)
    if T == 0:
        return out, hidden
    cfg = get_config("gemm", T, d, h, E, x.dtype)
    act = _empty((T, h), x.dtype, x.device)
    _launch_up(x, w1, b1, sorted_token_ids, expert_offsets, act, hidden if save_hidden else None, activation, cfg,
               common)
    # B[k, n] = w2[e, n, k]: w2 read transposed through its strides.
    _launch_down(act, w2, (w2.stride(2), w2.stride(1)), b2, gate, sorted_token_ids, expert_offsets, out, cfg, common)
    return out, hidden


@on_input_device
def moe_ffn_backward(grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, activation,
                     needs_grad):
    """Backend contract: ``(dx, dw1, db1, dw2, db2, dgate)``, all full-shaped; unneeded ones are left unwritten."""
    x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate = _contiguous_inputs(
        x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation)
    T, d = x.shape
    E, h, _ = w1.shape
    d_out = w2.shape[1]
    common = _common(x, E)
    n_x, n_w1, n_b1, n_w2, n_b2, n_g = (bool(v) for v in needs_grad)
    n_g = n_g and gate is not None
    dev, dt = x.device, x.dtype
    g_out = grad_out.to(dt).contiguous()

    need_dh = n_x or n_w1 or n_b1
    dx = _empty((T, d), dt, dev)
    dw1, db1 = _empty((E, h, d), w1.dtype, dev), _empty((E, h), b1.dtype, dev)
    dw2, db2 = _empty((E, d_out, h), w2.dtype, dev), _empty((E, d_out), b2.dtype, dev)
    dgate = _empty((T,), gate.dtype, dev) if gate is not None else x.new_empty(0)
    if T == 0:
        for t in (dw1, db1, dw2, db2):
            t.zero_()
        return dx, dw1, db1, dw2, db2, dgate

    cfg = get_config("gemm", T, d, h, E, dt)
    tok, offsets = sorted_token_ids, expert_offsets
    act = None
    if hidden.numel() == 0 and (need_dh or n_w2 or n_g):
        hidden = _empty((T, h), dt, dev)
        act = _empty((T, h), dt, dev) if n_w2 else None
        _launch_up(x, w1, b1, tok, offsets, act, hidden, activation, cfg, common)
    store_act = n_w2 and act is None
    if need_dh or n_g or store_act:
        hidden = hidden.contiguous()
        dh = _empty((T, h), dt, dev) if need_dh else None
        if store_act:
            act = _empty((T, h), dt, dev)
        n_tiles_h = triton.cdiv(h, cfg.block_n)
        n_tiles_m = triton.cdiv(T, cfg.block_m) + E
        dgate_part = _empty((n_tiles_h, T), torch.float32, dev) if n_g else None
        db1_part = _empty((n_tiles_m, h), torch.float32, dev) if n_b1 else None
        _moe_ffn_bwd_hidden_kernel[(n_tiles_m * n_tiles_h,)](
            g_out, w2, b2, gate if gate is not None else x, tok, offsets, hidden,
            dh if dh is not None else x, act if store_act else x, dgate_part if n_g else x,
            db1_part if n_b1 else x,
            E, h, d_out, T, g_out.stride(0), w2.stride(0), w2.stride(1), w2.stride(2),
            ACTIVATION=_ACT_CODES[activation], HAS_GATE=gate is not None, STORE_DH=need_dh, STORE_ACT=store_act,
            DGATE=n_g, STORE_DB=n_b1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            EVEN_K=d_out % cfg.block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
        )
        if n_g:
            dgate.copy_(dgate_part.sum(0))  # fixed-order sum over the h tiles: deterministic
    if n_x:
        # dX[tok] = dH W1[e]: B[k, n] = w1[e, k, n], read as stored.
        _launch_down(dh, w1, (w1.stride(1), w1.stride(2)), None, None, tok, offsets, dx, cfg, common)
    if n_w1 or n_b1 or n_w2 or n_b2:
        dcfg = get_config("dw", T, d, h, E, dt)
        if n_w1 or n_b1:
            # db1's partials come from the hidden kernel, one per BLOCK_M row tile.
            _launch_dw(dh, x, None, tok, offsets, False, True, n_w1, n_b1, E, dw1, db1, dcfg, common,
                       db_part=db1_part, db_chunk=cfg.block_m)
        if n_w2 or n_b2:
            _launch_dw(g_out, act if n_w2 else g_out, gate, tok, offsets, True, False, n_w2, n_b2, E, dw2, db2,
                       dcfg, common)
    return dx, dw1, db1, dw2, db2, dgate
