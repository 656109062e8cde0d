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
    hidden: P = G[tok] W2[e] (gather); dH = g * P * act'(H); g * act(H) for dW2 (the gate folded
            before its MMA); dgate = rowsum(act(H) * P) + G . b2 (== rowsum(G * (W2 a + b2)), no ungated
            output needed); db1 partials = column sums of the fp32 dH tile. Only the first column tile
            reads its G rows once more for G . b2 and the db2 partials (colsum g G): not every N tile.
            Its own config kind ("hidden", 64-column tiles): the epilogue keeps ~5 fp32 tiles live.
    dX:     dx[tok] = dH W1[e]  (the forward's down kernel with w1 read untransposed)
    dW:     dW1[e] = dH^T x[tok]; dW2[e] = G[tok]^T (g act(H)); both operands plain loads.
            Split-K over tokens in chunks sized to one or two waves of the GPU; an expert that fits
            one chunk stores dW directly, otherwise the last of its chunks to finish (a per-tile
            semaphore) sums all the fp32 partials in chunk order (deterministic, no float atomics,
            no extra launch). db1/db2: the first chunk of each expert sums the hidden kernel's
            per-row-tile partials in order.

Gated activations (``"geglu"`` etc., w1 [E, 2h, d]): the up kernel runs a second
accumulator over the g rows and writes act(a) * g; H is [T, 2h] (a, then g); the hidden
kernel writes dH = [g P act'(a), P act(a)], after which dX and dW1 are the ungated
launches with 2h in place of h. Absent biases (b1/b2 None) are constexpr branches.

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

Configs: ``get_config(kind, T, d, h, E, dtype, gpu)`` for kind "gemm" (up, down, dX), "hidden"
and "dw": an ``override_config`` (tests, tuning), else the tuned file of this GPU and shape
(``configs/``, written by ``benchmarks/tune_triton.py``; nearest token bucket), else a heuristic
(no autotuning at first call); under the interpreter, tiny blocks. No tuned file ships yet: the
heuristic has not been checked on a GPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
from torch import Tensor

from ..ops.moe_ffn import GATED_ACTIVATIONS
from . import configs as tuned_configs
from . import on_input_device
from .moe_ffn_kernels import (
    ACT_GELU,
    ACT_GELU_TANH,
    ACT_RELU,
    _moe_ffn_bwd_hidden_kernel,
    _moe_ffn_down_kernel,
    _moe_ffn_dw_kernel,
    _moe_ffn_up_kernel,
)

__all__ = ["SAVES_HIDDEN", "MoEFFNConfig", "get_config", "gpu_name", "moe_ffn_forward", "moe_ffn_backward", "override_config"]

SAVES_HIDDEN = True

_ACT_CODES = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2


@dataclass(frozen=True)
class MoEFFNConfig:
    """Launch settings of one kernel kind.

    ``kind="gemm"`` (up, down, dX) and ``"hidden"`` (bwd hidden): BLOCK_M rows x BLOCK_N columns, BLOCK_K deep.
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


_KINDS = ("gemm", "hidden", "dw")
_OVERRIDES: dict[str, MoEFFNConfig] = {}
_log = logging.getLogger(__name__)


@contextlib.contextmanager
def override_config(gemm: Optional[MoEFFNConfig] = None, dw: Optional[MoEFFNConfig] = None,
                    hidden: Optional[MoEFFNConfig] = None):
    """Use these configs for every call inside the block (tests, benchmarks, tuning).

    ``hidden`` (the backward's first kernel) defaults to ``gemm`` when only that is given.
    """
    saved = dict(_OVERRIDES)
    for kind, cfg in (("gemm", gemm), ("hidden", hidden if hidden is not None else gemm), ("dw", dw)):
        if cfg is not None:
            _OVERRIDES[kind] = cfg
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_name(device: torch.device) -> Optional[str]:
    """The GPU's name as the tuned config files spell it, or None (CPU, interpreter: no tuned configs)."""
    if device.type != "cuda" or _interpreting():
        return None
    return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def get_config(kind: str, T: int, d: int, h: int, E: int, dtype: torch.dtype,
               gpu: Optional[str] = None) -> MoEFFNConfig:
    """The config for ``kind`` ("gemm": up, down, dX; "hidden": the backward's first kernel; "dw")
    at this problem size: an override, else the tuned file of GPU ``gpu`` (a name from
    ``gpu_name``) for (d, h, E), nearest token bucket, else the heuristic."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if kind in _OVERRIDES:
        return _OVERRIDES[kind]
    if gpu is not None:
        cfg = _tuned_config(kind, T, d, h, E, dtype, gpu)
        if cfg is not None:
            return cfg
    bucket = 1 << max(4, min(16, (max(T, 1) - 1).bit_length()))  # 16 .. 65536 tokens
    return _default_config(kind, bucket, d, h, E, dtype, _interpreting())


def _tuned_config(kind, T, d, h, E, dtype, device) -> Optional[MoEFFNConfig]:
    shape = {"d": d, "h": h, "E": E}
    entry = tuned_configs.lookup(tuned_configs.load_table("moe_ffn", shape, device), kind,
                                 str(dtype).replace("torch.", ""), T)
    if entry is None:
        _warn_untuned(device, d, h, E)
        return None
    try:
        return MoEFFNConfig(**entry)
    except ValueError as err:
        raise ValueError(f"tuned moe_ffn config {kind}/{dtype}/T~{T} for {device} at {shape}: {err}; fix the file "
                         f"({tuned_configs.config_file_name('moe_ffn', shape, device)}) or rerun "
                         f"benchmarks/tune_triton.py") from err


@lru_cache(maxsize=None)
def _warn_untuned(device, d, h, E):
    _log.info("no tuned moe_ffn Triton configs for %s at d=%d h=%d E=%d (%s): using the heuristic; "
              "benchmarks/tune_triton.py writes them", device, d, h, E, tuned_configs.config_file_name(
                  "moe_ffn", {"d": d, "h": h, "E": E}, device))


# The heuristic as data, per kind: (up to this many tokens per expert, (block_m, block_n, block_k,
# num_warps, num_stages)); the first row that holds wins. Few tokens per expert: the GEMMs are
# weight-read bound, so many thin programs stream the weights in parallel. "hidden": its epilogue
# holds P, H, act(H), act'(H) (and the g half when gated) as fp32 tiles, so 64 columns and 32 tile
# elements per thread keep it under 255 registers (128 columns spilled 0.6-1.3 KB).
_HEURISTIC = {
    "gemm": ((32, (16, 64, 128, 4, 4)), (64, (32, 64, 128, 4, 4)), (256, (64, 64, 64, 4, 4)),
             (1024, (64, 128, 64, 4, 4)), (float("inf"), (128, 128, 64, 8, 4))),
    "hidden": ((32, (16, 64, 128, 4, 4)), (64, (32, 64, 128, 4, 4)), (1024, (64, 64, 64, 4, 4)),
               (float("inf"), (128, 64, 64, 8, 4))),
    "dw": ((256, (64, 64, 32, 4, 4)), (float("inf"), (128, 128, 64, 8, 4))),
}


@lru_cache(maxsize=None)
def _default_config(kind, bucket, d, h, E, dtype, interpret) -> MoEFFNConfig:
    if interpret:
        # Small tiles keep the CPU interpreter fast and make tiny test shapes span several tiles.
        return MoEFFNConfig(16, 32, 16, chunk=32 if kind == "dw" else 0)
    per_expert = bucket // E  # tokens per expert if the routing is balanced
    bm, bn, bk, warps, stages = next(cfg for limit, cfg in _HEURISTIC[kind] if per_expert <= limit)
    if dtype == torch.float32:  # 4-byte operands: halve the depth so the stages fit in shared memory
        bk, stages = max(16, bk // 2), min(stages, 3)
    return MoEFFNConfig(bm, bn, bk, warps, stages)


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_DW_WAVES = 2  # split-K chunks fill about this many waves of the GPU: enough to hide a wave tail, few partials


def _sms(device: torch.device) -> int:
    """The GPU's SM count (132 on CPU: the interpreter, and tests that model an H100/H200)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _dw_chunk(T: int, M: int, N: int, E: int, cfg: MoEFFNConfig, sms: int) -> int:
    """Tokens per split-K chunk: about ``_DW_WAVES`` waves of (tile, chunk) programs in all.

    T / chunk chunks at most (+ one partial chunk per expert), whatever the routing, so
    the fp32 partials (T / chunk slabs of M x N) stay a few MB, within L2; with balanced
    routing and few SMs per expert each expert is one chunk and no partial is written.
    """
    if cfg.chunk:
        return cfg.chunk
    bk = cfg.block_k
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    chunks = max(E, _DW_WAVES * sms // tiles)  # at least one per expert
    chunk = triton.cdiv(triton.cdiv(max(T, 1), chunks), bk) * bk
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
    E, h_up, _ = w1.shape
    gated = activation in GATED_ACTIVATIONS
    h = h_up // 2 if gated else h_up
    grid = ((triton.cdiv(T, cfg.block_m) + E) * triton.cdiv(h, cfg.block_n),)
    _moe_ffn_up_kernel[grid](
        x, w1, b1 if b1 is not None else x, tok, offsets,
        act if act is not None else x, hidden if hidden is not None else x,
        E, h, d, x.stride(0), w1.stride(0), w1.stride(1), w1.stride(2),
        ACTIVATION=_act_code(activation), GATED=gated, HAS_BIAS=b1 is not None, STORE_ACT=act is not None,
        STORE_H=hidden is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=d % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )


def _launch_down(a, w, stride_w, bias, gate, tok, offsets, out, cfg, common, add=None):
    """out[tok[r]] = (a[r] @ B_e (+ bias[e]) (+ add[tok[r]])) (* gate[tok[r]]), B_e[k, n] = w[e] at strides (k, n)."""
    T, K = a.shape
    N = out.shape[1]
    E = w.shape[0]
    grid = ((triton.cdiv(T, cfg.block_m) + E) * triton.cdiv(N, cfg.block_n),)
    _moe_ffn_down_kernel[grid](
        a, w, bias if bias is not None else a, gate if gate is not None else a, tok, offsets, out,
        add if add is not None else out,
        E, N, K, a.stride(0), w.stride(0), stride_w[0], stride_w[1],
        HAS_BIAS=bias is not None, HAS_GATE=gate is not None, HAS_ADD=add is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )


def _launch_dw(left, right, tok, offsets, l_gather, r_gather, want_w, E, dw, db, db_part, db_chunk, cfg, common):
    """dw[e] = sum_r L[r]^T R[r] over expert e's rows; db[e] = sum of ``db_part`` rows of expert e (or None).

    ``db_part``: fp32 column sums computed by the hidden kernel, one row per ``db_chunk``
    expert-ordered rows. Split-K chunks are reduced inside the kernel (see ``_moe_ffn_dw_kernel``).
    """
    T, M = left.shape
    N = right.shape[1]
    chunk = _dw_chunk(T, M, N, E, cfg, _sms(left.device))
    if not cfg.chunk and triton.cdiv(T, chunk) + E > _MAX_GRID_Y:
        # Chunks are grid axis 1, which CUDA caps at 65535 (the interpreter does not): widen them.
        chunk = triton.cdiv(triton.cdiv(T, _MAX_GRID_Y - E), cfg.block_k) * cfg.block_k
    n_chunks = triton.cdiv(T, chunk) + E  # each expert adds at most one partial chunk; surplus ones clear empty experts
    if n_chunks > _MAX_GRID_Y:
        raise ValueError(f"dw config chunk={chunk} makes {n_chunks} split-K chunks at T={T}, E={E}; CUDA allows "
                         f"{_MAX_GRID_Y} on grid axis 1: use a larger chunk (or 0 for automatic)")
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    pw = _empty((n_chunks, M, N), torch.float32, left.device) if want_w else left
    sem = torch.zeros((E, tiles), dtype=torch.int32, device=left.device) if want_w else left
    _moe_ffn_dw_kernel[(tiles, n_chunks)](
        left, right, tok, offsets, pw, sem, dw, db_part if db_part is not None else left,
        db if db_part is not None else dw, E, M, N, left.stride(0), right.stride(0), chunk, db_chunk,
        L_GATHER=l_gather, R_GATHER=r_gather, LOAD_TOK=l_gather or r_gather, COMPUTE_W=want_w,
        COMPUTE_B=db_part is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        E_POW2=common["E_POW2"], UPCAST=common["UPCAST"], PRECISION=common["PRECISION"],
    )


def _addend(t: Optional[Tensor], out: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    if t.shape != out.shape:
        raise ValueError(f"the shared expert's addend must be {tuple(out.shape)}, got {tuple(t.shape)}")
    return t.to(out.dtype).contiguous()


def _contiguous_inputs(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation):
    """Check the activation and make every operand contiguous (no copy when it already is).

    The kernels index the plan with unit stride; a strided plan (a column of a [T, L] tensor)
    would otherwise be misread.
    """
    _act_code(activation)
    tensors = (x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate)
    return tuple(t.contiguous() if t is not None else None for t in tensors)


def _act_code(activation: str) -> int:
    """The kernels' code of ``activation`` (of act in act(a) * g when gated)."""
    code = _ACT_CODES.get(GATED_ACTIVATIONS.get(activation, activation))
    if code is None:
        raise ValueError(f"activation must be one of {(*_ACT_CODES, *GATED_ACTIVATIONS)}, got {activation!r}")
    return code


@on_input_device
def moe_ffn_forward(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, save_hidden,
                    shared_out=None):
    """Backend contract: ``(out [T, d_out], hidden [T, h] expert order or empty)``; ``shared_out`` [T, d_out]
    (token order) is added in the down kernel's epilogue, before the gate."""
    x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate = _contiguous_inputs(
        x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation)
    T, d = x.shape
    E, h_up, _ = w1.shape
    d_out, h = w2.shape[1], w2.shape[2]
    common = _common(x, E)
    out = _empty((T, d_out), x.dtype, x.device)
    hidden = _empty((T, h_up), x.dtype, x.device) if save_hidden else x.new_empty(0)
    if T == 0:
        return out, hidden
    cfg = get_config("gemm", T, d, h, E, x.dtype, gpu_name(x.device))
    act = _empty((T, h), x.dtype, x.device)
    _launch_up(x, w1, b1, sorted_token_ids, expert_offsets, act, hidden if save_hidden else None, activation, cfg,
               common)
    # B[k, n] = w2[e, n, k]: w2 read transposed through its strides.
    _launch_down(act, w2, (w2.stride(2), w2.stride(1)), b2, gate, sorted_token_ids, expert_offsets, out, cfg, common,
                 add=_addend(shared_out, out))
    return out, hidden


@on_input_device
def moe_ffn_backward(grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, activation,
                     needs_grad, shared_dx=None):
    """Backend contract: ``(dx, dw1, db1, dw2, db2, dgate)``, all full-shaped; unneeded ones are left unwritten.
    ``shared_dx`` [T, d] (token order) is added to dx in the dX kernel's epilogue."""
    x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate = _contiguous_inputs(
        x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation)
    T, d = x.shape
    E, h_up, _ = w1.shape
    d_out, h = w2.shape[1], w2.shape[2]
    gated = activation in GATED_ACTIVATIONS
    common = _common(x, E)
    n_x, n_w1, n_b1, n_w2, n_b2, n_g = (bool(v) for v in needs_grad)
    n_g = n_g and gate is not None
    n_b1, n_b2 = n_b1 and b1 is not None, n_b2 and b2 is not None
    dev, dt = x.device, x.dtype
    g_out = grad_out.to(dt).contiguous()

    need_dh = n_x or n_w1 or n_b1
    dx = _empty((T, d), dt, dev)
    dw1, dw2 = _empty((E, h_up, d), w1.dtype, dev), _empty((E, d_out, h), w2.dtype, dev)
    # An absent bias gets an empty grad slot (one tensor each: custom-op outputs may not alias).
    db1 = _empty((E, h_up), b1.dtype, dev) if b1 is not None else x.new_empty(0)
    db2 = _empty((E, d_out), b2.dtype, dev) if b2 is not None else x.new_empty(0)
    dgate = _empty((T,), gate.dtype, dev) if gate is not None else x.new_empty(0)
    if T == 0:
        for t in (dw1, db1, dw2, db2):
            t.zero_()
        return dx, dw1, db1, dw2, db2, dgate

    gpu = gpu_name(dev)
    cfg = get_config("gemm", T, d, h, E, dt, gpu)
    hcfg = get_config("hidden", T, d, h, E, dt, gpu)
    tok, offsets = sorted_token_ids, expert_offsets
    if hidden.numel() == 0 and (need_dh or n_w2 or n_g or n_b2):  # the hidden kernel reads H
        hidden = _empty((T, h_up), dt, dev)
        _launch_up(x, w1, b1, tok, offsets, None, hidden, activation, cfg, common)
    gact = _empty((T, h), dt, dev) if n_w2 else None  # g * act(H), expert order: dW2's right operand
    dh = _empty((T, h_up), dt, dev) if need_dh else None
    n_tiles_h = triton.cdiv(h, hcfg.block_n)
    n_tiles_m = triton.cdiv(T, hcfg.block_m) + E
    b2_dot = n_g and b2 is not None
    dgate_part = _empty((n_tiles_h + b2_dot, T), torch.float32, dev) if n_g else None  # last row: G . b2
    db1_part = _empty((n_tiles_m, h_up), torch.float32, dev) if n_b1 else None
    db2_part = _empty((n_tiles_m, d_out), torch.float32, dev) if n_b2 else None
    if need_dh or n_g or n_w2 or n_b2:
        hidden = hidden.contiguous()
        _moe_ffn_bwd_hidden_kernel[(n_tiles_m * n_tiles_h,)](
            g_out, w2, b2 if b2 is not None else x, gate if gate is not None else x, tok, offsets,
            hidden, dh if dh is not None else x, gact if gact is not None else x,
            dgate_part if n_g else x, db1_part if n_b1 else x, db2_part if n_b2 else x,
            E, h, d_out, T, g_out.stride(0), w2.stride(0), w2.stride(1), w2.stride(2),
            ACTIVATION=_act_code(activation), GATED=gated, B2_DOT=b2_dot, HAS_GATE=gate is not None,
            STORE_DH=need_dh, STORE_ACT=n_w2, DGATE=n_g, STORE_DB=n_b1, STORE_DB2=n_b2, ROW_PASS=b2_dot or n_b2,
            BLOCK_M=hcfg.block_m, BLOCK_N=hcfg.block_n, BLOCK_K=hcfg.block_k, EVEN_K=d_out % hcfg.block_k == 0,
            num_warps=hcfg.num_warps, num_stages=hcfg.num_stages, **common,
        )
        if n_g:
            dgate.copy_(dgate_part.sum(0))  # fixed-order sum over the h tiles: deterministic
    if n_x:
        # dX[tok] = dH W1[e]: B[k, n] = w1[e, k, n], read as stored.
        _launch_down(dh, w1, (w1.stride(1), w1.stride(2)), None, None, tok, offsets, dx, cfg, common,
                     add=_addend(shared_dx, dx))
    if n_w1 or n_b1 or n_w2 or n_b2:
        dcfg = get_config("dw", T, d, h, E, dt, gpu)
        if n_w1 or n_b1:
            _launch_dw(dh, x, tok, offsets, False, True, n_w1, E, dw1, db1, db1_part, hcfg.block_m, dcfg, common)
        if n_w2 or n_b2:
            _launch_dw(g_out, gact if n_w2 else g_out, tok, offsets, True, False, n_w2, E, dw2, db2, db2_part,
                       hcfg.block_m, dcfg, common)
    return dx, dw1, db1, dw2, db2, dgate
