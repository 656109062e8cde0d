"""Triton kernels of the top-1 routed expert FFN; launchers live in ``moe_ffn.py``.

Every kernel maps its program to work through ``_expert_tile``: the expert-ordered
rows ``[0, T)`` are cut into tiles of ``BLOCK`` rows that never straddle an expert,
and a program finds its tile's expert by a prefix sum over ``expert_offsets`` done in
registers. The grid is an upper bound (``cdiv(T, BLOCK) + E`` tiles, since each expert
adds at most one partial tile), so no host ever reads the offsets; programs past the
last real tile exit at once.
"""
import triton
import triton.language as tl

# Activation codes (constexpr ints; the launcher maps the names).
ACT_GELU = 0
ACT_GELU_TANH = 1
ACT_RELU = 2


@triton.jit
def _expert_blocks(offsets_ptr, E, BLOCK, E_POW2: tl.constexpr):
    """Per expert lane (padded to E_POW2): first row, end row, its number of BLOCK-row blocks and the
    running end of those block counts. Lanes past E are empty."""
    ar = tl.arange(0, E_POW2)
    e_mask = ar < E
    lo = tl.load(offsets_ptr + ar, mask=e_mask, other=0)
    hi = tl.load(offsets_ptr + ar + 1, mask=e_mask, other=0)
    nblocks = (hi - lo + BLOCK - 1) // BLOCK
    return ar, lo, hi, nblocks, tl.cumsum(nblocks, 0)


@triton.jit
def _expert_tile(offsets_ptr, tile, E, BLOCK, E_POW2: tl.constexpr):
    """(expert, first row, end row of that expert) of ``tile``; expert >= E means no work."""
    ar, lo, hi, ntiles, ends = _expert_blocks(offsets_ptr, E, BLOCK, E_POW2)
    # Lanes past E hold ends == total, so they only count once the tile is out of range.
    e = tl.sum((ends <= tile).to(tl.int32), 0)
    sel = ar == e
    first_tile = tl.sum(tl.where(sel, ends - ntiles, 0), 0)
    row_lo = tl.sum(tl.where(sel, lo, 0), 0)
    row_end = tl.sum(tl.where(sel, hi, 0), 0)
    return e, row_lo + (tile - first_tile) * BLOCK, row_end


@triton.jit
def _gemm_program(offsets_ptr, N, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_POW2: tl.constexpr):
    """This program's (expert, row tile, column tile, expert-order rows, row mask, columns, column mask).

    Columns vary fastest, so the programs of one row tile run together and share its gathered
    rows in L2. An expert >= E means the program has no work.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tile_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    e, row_start, row_end = _expert_tile(offsets_ptr, tile_m, E, BLOCK_M, E_POW2)
    offs_r = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, tile_m, pid_n, offs_r, offs_r < row_end, offs_n, offs_n < N


@triton.jit
def _activation(h, ACTIVATION: tl.constexpr):
    # h: fp32 pre-activation
    if ACTIVATION == 0:  # exact erf GELU, as BERT uses
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACTIVATION == 1:  # tanh GELU; h * (1 + tanh(u)) / 2 == h * sigmoid(2u)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return h * tl.sigmoid(2.0 * u)
    else:
        return tl.maximum(h, 0.0)


@triton.jit
def _activation_grad(h, ACTIVATION: tl.constexpr):
    """(act(h), act'(h)) in fp32."""
    if ACTIVATION == 0:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        return h * cdf, cdf + h * pdf
    elif ACTIVATION == 1:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        return h * s, s + 2.0 * h * s * (1.0 - s) * du
    else:
        return tl.maximum(h, 0.0), tl.where(h > 0.0, 1.0, 0.0)


@triton.jit
def _gated_activation_grad(a, g, ACTIVATION: tl.constexpr):
    """(act(a) * g, d/da, d/dg) in fp32: the gated epilogue and its two partial derivatives."""
    u, du = _activation_grad(a, ACTIVATION)
    return u * g, du * g, u


@triton.jit
def _rows_times_weight(
    A_ptr,  # [*, K] row-major activations; rows picked by a_rows
    stride_am,
    a_rows,  # [BLOCK_M] int64 row indices into A
    row_mask,  # [BLOCK_M]
    W_ptr,  # one expert's weight, read as B[k, n] through the strides
    stride_wk,
    stride_wn,
    offs_n,  # [BLOCK_N]
    n_mask,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc[m, n] = sum_k A[a_rows[m], k] * B[k, n] in fp32 (both operands pure loads: MMA from shared memory)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = W_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong for bf16 inputs
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _moe_ffn_up_kernel(
    X_ptr,  # [T, K] token order (x)
    W_ptr,  # [E, N, K] (w1), read transposed
    B_ptr,  # [E, N] (b1)
    tok_ptr,  # [T] int64 sorted_token_ids
    offsets_ptr,  # [E+1] int64 expert_offsets
    ACT_ptr,  # [T, N] expert order: act(x W1^T + b1), written when STORE_ACT
    H_ptr,  # [T, N] expert order ([T, 2N] when GATED: a, then g): pre-activation, written when STORE_H
    E,
    N,  # output columns; W holds 2N rows (a rows, then g rows) when GATED
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_wk,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_ACT: tl.constexpr,
    STORE_H: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """GEMM1: gather rows of x through the plan, add b1, activate, write in expert order.

    GATED: a second accumulator over W's g rows; the epilogue writes act(a) * g.
    """
    e, tile_m, pid_n, offs_r, row_mask, offs_n, n_mask = _gemm_program(offsets_ptr, N, E, BLOCK_M, BLOCK_N, E_POW2)
    if e >= E:
        return
    tok = tl.load(tok_ptr + offs_r, mask=row_mask, other=0).to(tl.int64)
    w_e = W_ptr + e.to(tl.int64) * stride_we
    h = _rows_times_weight(X_ptr, stride_xm, tok, row_mask, w_e, stride_wk, stride_wn, offs_n, n_mask, K,
                           BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, PRECISION)
    if GATED:
        n_up = 2 * N
    else:
        n_up = N
    if HAS_BIAS:
        h += tl.load(B_ptr + e * n_up + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_off = offs_r[:, None] * N + offs_n[None, :]
    out_mask = row_mask[:, None] & n_mask[None, :]
    if GATED:
        g = _rows_times_weight(X_ptr, stride_xm, tok, row_mask, w_e + N * stride_wn, stride_wk, stride_wn, offs_n,
                               n_mask, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, PRECISION)
        if HAS_BIAS:
            g += tl.load(B_ptr + e * n_up + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        h_off = offs_r[:, None] * n_up + offs_n[None, :]
        if STORE_H:
            tl.store(H_ptr + h_off, h.to(H_ptr.dtype.element_ty), mask=out_mask)
            tl.store(H_ptr + h_off + N, g.to(H_ptr.dtype.element_ty), mask=out_mask)
        if STORE_ACT:
            tl.store(ACT_ptr + out_off, (_activation(h, ACTIVATION) * g).to(ACT_ptr.dtype.element_ty), mask=out_mask)
    else:
        if STORE_H:
            tl.store(H_ptr + out_off, h.to(H_ptr.dtype.element_ty), mask=out_mask)
        if STORE_ACT:
            tl.store(ACT_ptr + out_off, _activation(h, ACTIVATION).to(ACT_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _moe_ffn_down_kernel(
    A_ptr,  # [T, K] expert order (activation in the forward, dH in the backward)
    W_ptr,  # [E, ...] expert weight read as B[k, n] (w2 transposed fwd, w1 as is for dX)
    B_ptr,  # [E, N] bias (b2) when HAS_BIAS
    gate_ptr,  # [T] token order, when HAS_GATE
    tok_ptr,  # [T] int64 sorted_token_ids
    offsets_ptr,  # [E+1] int64 expert_offsets
    OUT_ptr,  # [T, N] token order
    ADD_ptr,  # [T, N] token order, added before the gate when HAS_ADD (the shared expert's product / dx)
    E,
    N,
    K,
    stride_am,
    stride_we,
    stride_wk,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_ADD: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """GEMM2 / dX: expert-ordered rows times the expert weight, scattered to token order.

    Top-1 routing writes every token row exactly once, so the scatter is a plain store, and a
    token-order addend (HAS_ADD) is read in the same epilogue: no extra pass over [T, N].
    """
    e, tile_m, pid_n, offs_r, row_mask, offs_n, n_mask = _gemm_program(offsets_ptr, N, E, BLOCK_M, BLOCK_N, E_POW2)
    if e >= E:
        return
    acc = _rows_times_weight(A_ptr, stride_am, offs_r, row_mask, W_ptr + e.to(tl.int64) * stride_we, stride_wk,
                             stride_wn, offs_n, n_mask, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, PRECISION)
    tok = tl.load(tok_ptr + offs_r, mask=row_mask, other=0).to(tl.int64)
    if HAS_BIAS:
        bias = tl.load(B_ptr + e * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]
    out_off = tok[:, None] * N + offs_n[None, :]
    out_mask = row_mask[:, None] & n_mask[None, :]
    if HAS_ADD:
        acc += tl.load(ADD_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate_ptr + tok, mask=row_mask, other=0.0).to(tl.float32)
        acc *= g[:, None]
    tl.store(OUT_ptr + out_off, acc.to(OUT_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grad_out_row_pass(
    G_ptr,  # [T, K] token order grad_out
    stride_gm,
    tok,  # [BLOCK_M] int64 token ids of the tile's rows
    row_mask,
    gt,  # [BLOCK_M] fp32 gate of the rows (ones without a gate)
    B2_ptr,  # [K] this expert's b2, when B2_DOT
    DB2_ptr,  # [K] this row tile's slot of the db2 partials, when STORE_DB2
    K,
    B2_DOT: tl.constexpr,
    STORE_DB2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One pass over the tile's grad_out rows: returns G . b2 per row and stores colsum(g * G) (db2 partial)."""
    gb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        g_rows = tl.load(G_ptr + tok[:, None] * stride_gm + kk[None, :], mask=row_mask[:, None] & k_mask[None, :],
                         other=0.0).to(tl.float32)
        if B2_DOT:
            gb += tl.sum(g_rows * tl.load(B2_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :], 1)
        if STORE_DB2:
            tl.store(DB2_ptr + kk, tl.sum(g_rows * gt[:, None], 0), mask=k_mask)
    return gb


@triton.jit
def _moe_ffn_bwd_hidden_kernel(
    G_ptr,  # [T, K] token order grad_out (K = d_out)
    W_ptr,  # [E, K, N] (w2), read as is
    B2_ptr,  # [E, K] (b2), for the dgate term G . b2 when B2_DOT
    gate_ptr,  # [T] token order, when HAS_GATE
    tok_ptr,  # [T] int64 sorted_token_ids
    offsets_ptr,  # [E+1] int64 expert_offsets
    H_ptr,  # [T, N] expert order ([T, 2N] when GATED: a, then g): saved pre-activation
    DH_ptr,  # like H_ptr: dL/d(pre-activation), written when STORE_DH
    ACT_ptr,  # [T, N] expert order: g * act(H), the gate-scaled activation dW2 reads, written when STORE_ACT
    DGATE_ptr,  # [cdiv(N, BLOCK_N) (+1 when B2_DOT), T] fp32 partial row sums, token order, when DGATE
    DB_ptr,  # [cdiv(T, BLOCK_M) + E, N (2N gated)] fp32 per-row-tile column sums of dH (db1 partials), STORE_DB
    DB2_ptr,  # [cdiv(T, BLOCK_M) + E, K] fp32 per-row-tile column sums of g * G (db2 partials), STORE_DB2
    E,
    N,
    K,
    T,
    stride_gm,
    stride_we,
    stride_wk,
    stride_wn,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    B2_DOT: tl.constexpr,  # DGATE and b2 present
    HAS_GATE: tl.constexpr,
    STORE_DH: tl.constexpr,
    STORE_ACT: tl.constexpr,
    DGATE: tl.constexpr,
    STORE_DB: tl.constexpr,
    STORE_DB2: tl.constexpr,
    ROW_PASS: tl.constexpr,  # B2_DOT or STORE_DB2 (one flag: older Triton has no constexpr `or`)
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """P = gather(G) W2[e]; dH = g * P * act'(H); g * act(H) for dW2; dgate partial = rowsum(act(H) * P).

    The dgate identity: rowsum(G * (W2 a + b2)) = rowsum(a * (G W2)) + G . b2, so the
    ungated output never has to be recomputed. G . b2 and the db2 column sums need no
    weight, so only the first column tile computes them, in one pass over its G rows
    (the last DGATE row holds G . b2). GATED: act = act(a) * g, and dH holds
    dL/da = P * g * act'(a) in the a columns and dL/dg = P * act(a) in the g columns.
    Writing g * act(H) here folds the gate before dW2's MMA, so both its operands are pure loads.
    """
    e, tile_m, pid_n, offs_r, row_mask, offs_n, n_mask = _gemm_program(offsets_ptr, N, E, BLOCK_M, BLOCK_N, E_POW2)
    if e >= E:
        return
    tok = tl.load(tok_ptr + offs_r, mask=row_mask, other=0).to(tl.int64)
    if HAS_GATE:
        gt = tl.load(gate_ptr + tok, mask=row_mask, other=0.0).to(tl.float32)
    else:
        gt = tl.full((BLOCK_M,), 1.0, tl.float32)
    if ROW_PASS:
        if pid_n == 0:
            gb = _grad_out_row_pass(G_ptr, stride_gm, tok, row_mask, gt, B2_ptr + e * K, DB2_ptr + tile_m * K, K,
                                    B2_DOT, STORE_DB2, BLOCK_M, BLOCK_K)
            if B2_DOT:
                tl.store(DGATE_ptr + tl.cdiv(N, BLOCK_N) * T + tok, gb, mask=row_mask)
    p = _rows_times_weight(G_ptr, stride_gm, tok, row_mask, W_ptr + e.to(tl.int64) * stride_we, stride_wk,
                           stride_wn, offs_n, n_mask, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, PRECISION)
    off = offs_r[:, None] * N + offs_n[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    if GATED:
        n_up = 2 * N
        h_off = offs_r[:, None] * n_up + offs_n[None, :]
        hg = tl.load(H_ptr + h_off + N, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H_ptr + h_off, mask=mask, other=0.0).to(tl.float32)
        a, da, dg = _gated_activation_grad(h, hg, ACTIVATION)
    else:
        n_up = N
        h_off = off
        h = tl.load(H_ptr + off, mask=mask, other=0.0).to(tl.float32)
        a, da = _activation_grad(h, ACTIVATION)
    if STORE_ACT:
        tl.store(ACT_ptr + off, (a * gt[:, None]).to(ACT_ptr.dtype.element_ty), mask=mask)
    if DGATE:
        tl.store(DGATE_ptr + pid_n * T + tok, tl.sum(a * p, 1), mask=row_mask)
    if STORE_DH:
        p *= gt[:, None]
        dh = p * da
        tl.store(DH_ptr + h_off, dh.to(DH_ptr.dtype.element_ty), mask=mask)
        if STORE_DB:  # db1 partial from the fp32 tile, so the dW1 kernel keeps dH a pure MMA operand
            tl.store(DB_ptr + tile_m * n_up + offs_n, tl.sum(tl.where(mask, dh, 0.0), 0), mask=n_mask)
        if GATED:
            dhg = p * dg
            tl.store(DH_ptr + h_off + N, dhg.to(DH_ptr.dtype.element_ty), mask=mask)
            if STORE_DB:
                tl.store(DB_ptr + tile_m * n_up + N + offs_n, tl.sum(tl.where(mask, dhg, 0.0), 0), mask=n_mask)


@triton.jit
def _chunk_of(offsets_ptr, chunk, E, CHUNK, E_POW2: tl.constexpr):
    """Where split-K chunk ``chunk`` lies when every expert is cut into CHUNK-row chunks.

    Returns (expert, its first chunk, its end chunk, first row, end row); expert >= E for a
    surplus chunk, which then gets the rank of the empty expert it clears (or E + 1: none) instead.
    """
    ar, lo, hi, nchunks, ends = _expert_blocks(offsets_ptr, E, CHUNK, E_POW2)
    total = tl.max(ends, 0)
    if chunk < total:
        e = tl.sum((ends <= chunk).to(tl.int32), 0)
    else:
        # Surplus chunk j = chunk - total clears the j-th empty expert: there are more surplus
        # chunks than empty experts, since each non-empty expert adds at most one partial chunk.
        empty = (hi == lo) & (ar < E)
        sel_empty = empty & (tl.cumsum(empty.to(tl.int32), 0) - 1 == chunk - total)
        e = tl.where(tl.sum(sel_empty.to(tl.int32), 0) > 0, tl.sum(tl.where(sel_empty, ar, 0), 0), E + 1)
    sel = ar == e
    c_end = tl.sum(tl.where(sel, ends, 0), 0)
    c_first = c_end - tl.sum(tl.where(sel, nchunks, 0), 0)
    row_start = tl.sum(tl.where(sel, lo, 0), 0) + (chunk - c_first) * CHUNK
    return e, c_first, c_end, row_start, tl.sum(tl.where(sel, hi, 0), 0)


@triton.jit
def _moe_ffn_dw_kernel(
    L_ptr,  # [T, M] rows: expert order (dH) or token order (grad_out, L_GATHER)
    R_ptr,  # [T, N] rows: token order (x, R_GATHER) or expert order (g * activation)
    tok_ptr,  # [T] int64 sorted_token_ids
    offsets_ptr,  # [E+1] int64 expert_offsets
    PW_ptr,  # [C, M, N] fp32 partial dW of the experts cut into several chunks, one slab per chunk
    SEM_ptr,  # [E, tiles] int32 zeros: chunks of (expert, tile) done so far
    DW_ptr,  # [E, M, N] weight dtype
    PB_ptr,  # [CB, M] fp32 db partials, one row per CHUNK_B expert-ordered rows (from the hidden kernel)
    DB_ptr,  # [E, M] bias dtype
    E,
    M,
    N,
    stride_lm,
    stride_rm,
    CHUNK,  # token rows per chunk, a multiple of BLOCK_K (runtime: it follows T)
    CHUNK_B,  # rows per db partial
    L_GATHER: tl.constexpr,
    R_GATHER: tl.constexpr,
    LOAD_TOK: tl.constexpr,  # L_GATHER or R_GATHER (one flag: older Triton has no constexpr `or`)
    COMPUTE_W: tl.constexpr,
    COMPUTE_B: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dW[e] = L[rows of e]^T R[rows of e], split-K over tokens, reduced in the kernel; db[e] = sum of partials.

    Program (tile, chunk): chunks are CHUNK expert-ordered rows inside one expert. An expert
    that fits one chunk writes dW directly. Otherwise every chunk stores its fp32 partial,
    then counts itself done on the (expert, tile) semaphore; the last one to arrive sums
    all of the expert's partials in chunk order, so the result does not depend on which
    chunk finished last (deterministic, no float atomics). Surplus chunks zero empty experts.
    Both MMA operands are plain loads (the gate is folded into R by the hidden kernel).
    """
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    e, c_first, c_end, row_start, row_end = _chunk_of(offsets_ptr, chunk, E, CHUNK, E_POW2)
    if e > E:
        return
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    e64 = e.to(tl.int64)
    if COMPUTE_W:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)  # an empty expert's surplus chunk runs no step
        row_stop = tl.minimum(row_start + CHUNK, row_end)
        for r0 in range(row_start, row_stop, BLOCK_K):
            offs_r = (r0 + offs_k).to(tl.int64)
            r_mask = offs_r < row_stop
            if LOAD_TOK:
                tok = tl.load(tok_ptr + offs_r, mask=r_mask, other=0).to(tl.int64)
            if L_GATHER:
                l_rows = tok
            else:
                l_rows = offs_r
            if R_GATHER:
                r_rows = tok
            else:
                r_rows = offs_r
            lt = tl.load(L_ptr + l_rows[:, None] * stride_lm + offs_m[None, :],
                         mask=r_mask[:, None] & m_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
            rt = tl.load(R_ptr + r_rows[:, None] * stride_rm + offs_n[None, :],
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            if UPCAST:
                lt = lt.to(tl.float32)
                rt = rt.to(tl.float32)
            acc = tl.dot(tl.trans(lt), rt, acc, input_precision=PRECISION)
        w_off = offs_m[:, None] * N + offs_n[None, :]  # after the loop: a live [M, N] int tile would spill
        w_mask = m_mask[:, None] & n_mask[None, :]
        if c_end - c_first <= 1:  # the expert's only chunk, or a surplus chunk clearing an empty expert
            tl.store(DW_ptr + e64 * M * N + w_off, acc.to(DW_ptr.dtype.element_ty), mask=w_mask)
        else:
            c64 = chunk.to(tl.int64)
            tl.store(PW_ptr + c64 * M * N + w_off, acc, mask=w_mask)
            tl.debug_barrier()  # every thread's partial is stored before the (one-thread) release below
            done = tl.atomic_add(SEM_ptr + e * tl.num_programs(0) + pid, 1, sem="acq_rel")
            if done == c_end - c_first - 1:  # the last chunk of (expert, tile) to finish
                # Summed in 16-row slices (acc is dead by now): a full fp32 tile plus its 64-bit pointers
                # spilled at 128 x 128. .cg: read from L2, where the other chunks' stores are, not a stale L1.
                for i in tl.static_range(0, BLOCK_M, 16):
                    rows = pid_m * BLOCK_M + i + tl.arange(0, 16)
                    r_off = rows[:, None] * N + offs_n[None, :]
                    r_mask = (rows < M)[:, None] & n_mask[None, :]
                    pw_slab = PW_ptr + c_first * M * N
                    total = tl.load(pw_slab + r_off, mask=r_mask, other=0.0, cache_modifier=".cg")
                    for _ in range(c_first + 1, c_end):
                        pw_slab += M * N
                        total += tl.load(pw_slab + r_off, mask=r_mask, other=0.0, cache_modifier=".cg")
                    tl.store(DW_ptr + e64 * M * N + r_off, total.to(DW_ptr.dtype.element_ty), mask=r_mask)
    if COMPUTE_B:
        if pid_n == 0:
            if (chunk == c_first) | (c_end == c_first):  # the expert's first chunk, or the one clearing it
                _, _, _, b_nblocks, b_ends = _expert_blocks(offsets_ptr, E, CHUNK_B, E_POW2)
                ar = tl.arange(0, E_POW2)
                b_end = tl.sum(tl.where(ar == e, b_ends, 0), 0)
                b_first = b_end - tl.sum(tl.where(ar == e, b_nblocks, 0), 0)
                db = tl.zeros((BLOCK_M,), dtype=tl.float32)
                pb_ptrs = PB_ptr + b_first * M + offs_m
                for _ in range(b_first, b_end):
                    db += tl.load(pb_ptrs, mask=m_mask, other=0.0)
                    pb_ptrs += M
                tl.store(DB_ptr + e64 * M + offs_m, db.to(DB_ptr.dtype.element_ty), mask=m_mask)
