"""End to end: BERT-base, dense against MoEBERT-patched, with no download.

The model is ``BertConfig()`` (12 layers, d=768, FFN 3072, vocab 30522) with random weights;
speed does not depend on the values. The patched model is ``moebert_kernels.patch(model,
num_experts=4, expert_size=768, shared=512)`` with hash routing (the paper's setting), its MoE
layers on whatever backend the dispatch picks (recorded in ``extra_info``).

- ``e2e_infer``: encoder inference (``BertModel``, ``inference_mode``) at batch x seq = 1x128
  and 32x128; on CPU only 1x128 by default (32x128 is ~7 s a call on 2 cores; set
  ``MOEBERT_BENCH_FULL=1``).
- ``e2e_train``: one distillation step: the frozen dense teacher's forward (no grad), the
  student's forward and backward with the layer-wise distillation loss (``ops.distill_loss``
  when it is importable, else an eager MSE over the 13 hidden states), and an AdamW step.
  ``student=dense`` is the same step with a dense student, the cost MoEBERT replaces.

Note on the FLOP bound: per token and layer, BERT-base spends 4*768^2 MACs in attention
projections and 2*768*3072 in the FFN; the MoE FFN spends 2*768^2. So a perfect MoE FFN makes the
encoder at most about (4+8)/(4+2) = 2.0x faster (less with attention scores and embeddings).
"""
from __future__ import annotations

import copy

import pytest
import torch

from _timing import bench_device, bench_dtype, full_matrix
from moebert_kernels import patch, select_backend

transformers = pytest.importorskip("transformers")

DEVICE = bench_device()
DTYPE = bench_dtype(DEVICE)
DTYPE_NAME = str(DTYPE).replace("torch.", "")
SEQ = 128
INFER_BATCHES = [1, 32] if (DEVICE.type == "cuda" or full_matrix()) else [1]
TRAIN_BATCHES = [32] if DEVICE.type == "cuda" else ([8] if full_matrix() else [1])
PATCH_KW = dict(num_experts=4, expert_size=768, shared=512)


def _config():
    cfg = transformers.BertConfig()  # BERT-base sizes
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.1
    return cfg


_MODELS: dict = {}


def _dense_model(cls, seed=0):
    """A fresh copy of a randomly initialised model (initialising BERT-base once is the slow part)."""
    if (cls, seed) not in _MODELS:
        torch.manual_seed(seed)
        _MODELS[(cls, seed)] = cls(_config()).to(device=DEVICE, dtype=DTYPE)
    return copy.deepcopy(_MODELS[(cls, seed)])


def _batch(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, _config().vocab_size, (B, SEQ), generator=g).to(DEVICE)
    return ids, torch.ones_like(ids)


def _moe_flops_per_token(cfg, moe: bool) -> float:
    """Forward FLOPs per token of the encoder (projections, scores, FFN); embeddings left out."""
    d, L, S = cfg.hidden_size, cfg.num_hidden_layers, SEQ
    ffn = 2 * d * PATCH_KW["expert_size"] if moe else 2 * d * cfg.intermediate_size
    return 2.0 * L * (4 * d * d + 2 * S * d + ffn)


@pytest.mark.parametrize("model", ["dense", "moe"])
@pytest.mark.parametrize("B", INFER_BATCHES)
def test_e2e_infer(bench, B, model):
    bench.benchmark.group = f"e2e_infer {B}x{SEQ} {DTYPE_NAME}"
    net = _dense_model(transformers.BertModel).eval()
    if model == "moe":
        net = patch(net, **PATCH_KW)
    ids, mask = _batch(B)

    def fn():
        with torch.inference_mode():
            return net(input_ids=ids, attention_mask=mask).last_hidden_state

    backend = select_backend("moe_ffn", DEVICE) if model == "moe" else "none"
    flops = B * SEQ * _moe_flops_per_token(net.config, model == "moe")
    bench.run(fn, flops=flops, kind="e2e_infer", impl=model, B=B, S=SEQ, T=B * SEQ, dtype=DTYPE_NAME,
              moe_backend=backend, warmup=2)


def _loss_fn():
    try:
        from moebert_kernels.ops.distill_loss import distill_loss
    except ImportError:
        distill_loss = None
    if distill_loss is not None:
        def loss(s, t, labels):
            out = distill_loss(list(s.hidden_states), list(t.hidden_states), s.logits, t.logits, labels)
            return out[0], "ops.distill_loss"
        return loss

    def eager(s, t, labels):
        mse = sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(s.hidden_states, t.hidden_states))
        return mse + torch.nn.functional.cross_entropy(s.logits.float(), labels), "eager MSE + CE"
    return eager


@pytest.mark.parametrize("student", ["dense", "moe"])
@pytest.mark.parametrize("B", TRAIN_BATCHES)
def test_e2e_train(bench, B, student):
    bench.benchmark.group = f"e2e_train {B}x{SEQ} {DTYPE_NAME}"
    cls = transformers.BertForSequenceClassification
    teacher = _dense_model(cls).eval()
    net = copy.deepcopy(teacher).train()
    if student == "moe":
        net = patch(net, **PATCH_KW)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    ids, mask = _batch(B)
    labels = torch.randint(0, net.config.num_labels, (B,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    loss_fn = _loss_fn()
    used = {}

    def fn():
        with torch.no_grad():
            t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        s_out = net(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        loss, used["loss"] = loss_fn(s_out, t_out, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    backend = select_backend("moe_ffn", DEVICE) if student == "moe" else "none"
    # teacher forward + student forward and backward (3x), optimizer left out of the count
    flops = B * SEQ * (_moe_flops_per_token(net.config, False) + 3 * _moe_flops_per_token(net.config, student == "moe"))
    fn()  # fills used["loss"]
    bench.run(fn, flops=flops, kind="e2e_train", impl=student, B=B, S=SEQ, T=B * SEQ, dtype=DTYPE_NAME,
              moe_backend=backend, loss=used["loss"], warmup=1)
