"""Plain-torch models of the ``torch.ops.moebert_C`` ops the cuda moe_ffn backend calls (csrc/moe_ffn.cu).

Each takes the same arguments and writes the same outputs as its C++ op, computing in fp32 and rounding once.
Two uses: on CPU, ``monkeypatch.setattr(cuda_moe_ffn, "_ops", lambda: MODEL)`` runs the backend's launchers
(which GEMM, which operands, gate, shared expert, gated activations, absent biases) against the reference
without a GPU; on a GPU, each real op is compared with its model.

``grouped_gemm`` executes the per-expert problems of ``grouped_gemm_plan_reference`` (shapes and element
offsets into flat operands), so it also checks that the argument builder's plan describes the right GEMMs.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from moebert_kernels.cuda.moe_ffn import GEMM_KINDS, grouped_gemm_plan_reference

_ACTS = {0: F.gelu, 1: lambda v: F.gelu(v, approximate="tanh"), 2: F.relu}


def _act_grad(v, code):
    if code == 2:
        return (v > 0).to(v.dtype)
    return torch.ops.aten.gelu_backward(torch.ones_like(v), v, approximate="tanh" if code == 1 else "none")


def _expert_of_rows(offsets, T):
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts, output_size=T)


def grouped_gemm(a, b, expert_offsets, kind, out, impl=0):
    wgrad = kind == GEMM_KINDS["weight_grad"]
    T = a.shape[0]
    if wgrad:
        M, N, K = a.shape[1], b.shape[1], 0
    elif kind == GEMM_KINDS["rows_x_wt"]:
        M, N, K = 0, b.shape[1], a.shape[1]
    else:
        M, N, K = 0, b.shape[2], a.shape[1]
    fa, fb, fd = a.reshape(-1).float(), b.reshape(-1).float(), out.view(-1)
    assert a.shape[0] == T
    for e, (m, n, k, a_off, b_off, d_off) in enumerate(grouped_gemm_plan_reference(expert_offsets.tolist(), kind,
                                                                                     M, N, K)):
        if wgrad:
            if m == 0:
                out[e].zero_()
                continue
            A = fa[a_off:a_off + k * m].view(k, m).t()
            B = fb[b_off:b_off + k * n].view(k, n)
        else:
            if m == 0:
                continue
            A = fa[a_off:a_off + m * k].view(m, k)
            Bm = fb[b_off:b_off + n * k]
            B = Bm.view(n, k).t() if kind == GEMM_KINDS["rows_x_wt"] else Bm.view(k, n)
        fd[d_off:d_off + m * n].copy_((A @ B).reshape(-1).to(out.dtype))


def moe_bias_act(h, bias, expert_offsets, activation, gated, a):
    T = h.shape[0]
    if bias is not None:
        h.copy_((h.float() + bias.float().index_select(0, _expert_of_rows(expert_offsets, T))).to(h.dtype))
    if a.numel():
        hf = h.float()
        if gated:
            ha, hg = hf.chunk(2, dim=-1)
            a.copy_((_ACTS[activation](ha) * hg).to(a.dtype))
        else:
            a.copy_(_ACTS[activation](hf).to(a.dtype))


def moe_scatter_rows(rows, sorted_token_ids, expert_offsets, bias, gate, add, out):
    T = rows.shape[0]
    v = rows.float()
    if bias is not None:
        v = v + bias.float().index_select(0, _expert_of_rows(expert_offsets, T))
    if add is not None:
        v = v + add.float().index_select(0, sorted_token_ids)
    if gate is not None:
        v = v * gate.index_select(0, sorted_token_ids).unsqueeze(-1)
    out.index_copy_(0, sorted_token_ids, v.to(out.dtype))


def moe_act_backward(p, h, sorted_token_ids, expert_offsets, gate, grad_out, b2, activation, gated, dh, ga, dgate):
    T = p.shape[0]
    g = gate.index_select(0, sorted_token_ids).unsqueeze(-1) if gate is not None else torch.ones(T, 1, device=p.device)
    pf, hf = p.float(), h.float()
    if gated:
        ha, hg = hf.chunk(2, dim=-1)
        av = _ACTS[activation](ha)
        dh.copy_(torch.cat([g * pf * hg * _act_grad(ha, activation), g * pf * av], -1).to(dh.dtype))
        full = av * hg
    else:
        full = _ACTS[activation](hf)
        dh.copy_((g * pf * _act_grad(hf, activation)).to(dh.dtype))
    if ga.numel():
        ga.copy_((g * full).to(ga.dtype))
    if dgate.numel():
        dot = (pf * full).sum(-1)
        if b2 is not None:
            e = _expert_of_rows(expert_offsets, T)
            dot = dot + (grad_out.float().index_select(0, sorted_token_ids) * b2.float().index_select(0, e)).sum(-1)
        dgate.index_copy_(0, sorted_token_ids, dot)


def moe_segment_colsum(x, expert_offsets, scale, sorted_token_ids, partial):
    xf = x.float()
    if scale is not None:
        xf = xf * scale.index_select(0, sorted_token_ids).unsqueeze(-1)
    partial.zero_()
    bounds = expert_offsets.tolist()
    for e in range(partial.shape[0]):
        partial[e, 0] = xf[bounds[e]:bounds[e + 1]].sum(0)


MODEL = SimpleNamespace(grouped_gemm=grouped_gemm, moe_bias_act=moe_bias_act, moe_scatter_rows=moe_scatter_rows,
                        moe_act_backward=moe_act_backward, moe_segment_colsum=moe_segment_colsum)
