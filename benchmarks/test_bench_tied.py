"""The tied shared expert at the batch sizes inference runs at: BERT-base, dense against its students.

Models (``BertConfig()``: 12 layers, d=768, FFN 3072; random weights, hash routing), all in one group
per (B, dtype) so one table compares them:

- ``dense``   BERT-base as it is;
- ``pruned``  ``patch(num_experts=1, expert_size=768, shared=0)``: a dense FFN of the students' active
              width, the speed a routed FFN of this cost can at best reach;
- ``untied``  ``patch(num_experts=4, expert_size=768, shared=512)``: the paper's layout (shared neurons
              copied into every expert; as many FFN weight bytes as dense);
- ``tied``    the same with ``tie_shared=True``: the 512 shared neurons stored once as a dense FFN every
              token runs, each expert keeps its own 256 (half the FFN weights).

``tied_infer``: encoder inference (``inference_mode``), B in {1, 8}, S=128, fp32 and bf16 weights
(CPU: 2 torch threads; GPU: bf16, B in {1, 8, 32}).
``tied_ffn``: the FFN layer alone (residual LayerNorm included) on T tokens: T=128 on CPU, fp32 and bf16;
on a GPU bf16 at T from 128 to 64k, with the layer on whatever backend the dispatch picks.

Cases run one after another, not interleaved: on a shared machine compare ratios from one quiet run only.
"""
from __future__ import annotations

import copy

import pytest
import torch

from _timing import bench_device
from moebert_kernels import HashRouter, MoEFeedForward, patch, select_backend

transformers = pytest.importorskip("transformers")

DEVICE = bench_device()
GPU = DEVICE.type == "cuda"
DTYPES = [torch.bfloat16] if GPU else [torch.float32, torch.bfloat16]
BATCHES = [1, 8, 32] if GPU else [1, 8]
FFN_TOKENS = [128, 1024, 4096, 16384, 65536] if GPU else [128]
SEQ = 128
MODELS = {
    "dense": None,
    "pruned": dict(num_experts=1, expert_size=768, shared=0),
    "untied": dict(num_experts=4, expert_size=768, shared=512),
    "tied": dict(num_experts=4, expert_size=768, shared=512, tie_shared=True),
}
_BASE: dict = {}
_CURRENT: dict = {}  # the one patched model alive: cases are ordered so each is built once


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _model(kind: str, dtype: torch.dtype):
    if (kind, dtype) in _CURRENT:
        return _CURRENT[(kind, dtype)]
    _CURRENT.clear()
    if "bert" not in _BASE:
        torch.manual_seed(0)
        _BASE["bert"] = transformers.BertModel(transformers.BertConfig()).eval()
    net = copy.deepcopy(_BASE["bert"])
    if MODELS[kind] is not None:
        patch(net, **MODELS[kind])
    _CURRENT[(kind, dtype)] = net = net.to(device=DEVICE, dtype=dtype)
    return net


# B varies fastest, so each model is built once per dtype.
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_tied_infer(bench, B, dtype, model):
    bench.benchmark.group = f"e2e_tied_infer {B}x{SEQ} {_name(dtype)}"
    net = _model(model, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, net.config.vocab_size, (B, SEQ), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)

    def fn():
        with torch.inference_mode():
            return net(input_ids=ids, attention_mask=mask).last_hidden_state

    needs = ("shared",) if model == "tied" else ()
    backend = "none" if model == "dense" else select_backend("moe_ffn", DEVICE, needs=needs)
    bench.run(fn, kind="e2e_tied_infer", impl=model, B=B, S=SEQ, T=B * SEQ, dtype=_name(dtype),
              moe_backend=backend, params=sum(p.numel() for p in net.parameters()), warmup=3)


class _DenseFFN(torch.nn.Module):
    """BERT's FFN with its residual LayerNorm: LN(x + W2 gelu(W1 x + b1) + b2)."""

    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.fc1, self.fc2, self.ln = torch.nn.Linear(d, d_ff), torch.nn.Linear(d_ff, d), torch.nn.LayerNorm(d)

    def forward(self, x):
        return self.ln(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def _ffn(kind: str, d: int = 768):
    torch.manual_seed(0)
    if kind == "dense":
        return _DenseFFN(d, 3072)
    kw = MODELS[kind]
    s = kw["shared"] if kw.get("tie_shared") else 0
    return MoEFeedForward(d, kw["expert_size"] - s, kw["num_experts"], router=HashRouter(30522, kw["num_experts"]),
                          dropout=0.0, shared_size=s)


@pytest.mark.parametrize("impl", list(MODELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("T", FFN_TOKENS)
def test_tied_ffn(bench, T, dtype, impl):
    bench.benchmark.group = f"tied_ffn T={T} {_name(dtype)}"
    layer = _ffn(impl).eval().to(device=DEVICE, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 768, generator=g).to(device=DEVICE, dtype=dtype)
    ids = torch.randint(0, 30522, (T,), generator=g).to(DEVICE)

    def fn():
        with torch.inference_mode():
            return layer(x) if impl == "dense" else layer(x, input_ids=ids)

    needs = ("shared",) if impl == "tied" else ()
    backend = "none" if impl == "dense" else select_backend("moe_ffn", DEVICE, needs=needs)
    _CURRENT.clear()
    bench.run(fn, kind="tied_ffn", impl=impl, T=T, dtype=_name(dtype), moe_backend=backend,
              baseline=impl == "dense", weights=sum(p.numel() for p in layer.parameters() if p.dim() > 1),
              warmup=3)
