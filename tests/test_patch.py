import pytest
import torch
import transformers
from transformers import (BertConfig, BertForSequenceClassification, BertModel, DistilBertConfig,
                          DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

import moebert_kernels as mk
from moebert_kernels import MoEFeedForward

D, FF, L = 32, 64, 2


def tiny(kind: str, cls=None):
    torch.manual_seed(torch.seed() % 2**31)
    if kind == "bert":
        cfg = BertConfig(vocab_size=120, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                         intermediate_size=FF, max_position_embeddings=64, num_labels=3)
        cls = cls or BertForSequenceClassification
    elif kind == "roberta":
        cfg = RobertaConfig(vocab_size=120, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                            intermediate_size=FF, max_position_embeddings=70, num_labels=3, pad_token_id=1)
        cls = cls or RobertaForSequenceClassification
    else:
        cfg = DistilBertConfig(vocab_size=120, dim=D, n_layers=L, n_heads=4, hidden_dim=FF,
                               max_position_embeddings=64, num_labels=3)
        cls = cls or DistilBertForSequenceClassification
    model = cls(cfg).eval()
    with torch.no_grad():  # HF inits LayerNorm to (1, 0); make it non-trivial so copies are checked
        for n, p in model.named_parameters():
            if "LayerNorm" in n or "layer_norm" in n:
                p.uniform_(0.5, 1.5) if n.endswith("weight") else p.normal_(0, 0.1)
    return model


def batch(B=3, S=9):
    ids = torch.randint(3, 120, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_single_full_expert_equals_dense(kind):
    model = tiny(kind)
    ids, mask = batch()
    dense = logits(model, ids, mask)
    mk.patch(model, num_experts=1, expert_size=FF, shared=0)
    assert len(mk.moe_layers(model)) == L
    torch.testing.assert_close(logits(model, ids, mask), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_importance_permutation_with_one_expert_equals_dense(kind):
    model = tiny(kind)
    ids, mask = batch()
    dense = logits(model, ids, mask)
    mk.patch(model, num_experts=1, expert_size=FF, shared=0, importance=torch.rand(L, FF))
    torch.testing.assert_close(logits(model, ids, mask), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("router", ["hash", "token_gate", "sentence_gate"])
def test_forward_backward_and_save_load(kind, router, tmp_path):
    model = tiny(kind)
    mk.patch(model, num_experts=4, expert_size=24, shared=12, router=router, seed=7)
    model.train()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    loss = out.loss + (mk.aux_loss(model) if router != "hash" else 0)
    loss.backward()
    for m in mk.moe_layers(model):
        assert m.w1.grad is not None and m.w1.grad.abs().sum() > 0
        assert m.ln_weight.grad is not None
    model.eval()
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = mk.from_pretrained(str(tmp_path))
    assert type(loaded) is type(model)
    assert loaded.config.moebert == model.config.moebert
    torch.testing.assert_close(logits(loaded, ids, mask), before, rtol=0, atol=0)
    for a, b in zip(mk.moe_layers(model), mk.moe_layers(loaded)):
        if router == "hash":
            assert torch.equal(a.router.table, b.router.table)


def test_hash_tables_differ_per_layer_and_plans_are_built_once(monkeypatch):
    model = tiny("bert")
    mk.patch(model, num_experts=4, expert_size=24, shared=12)
    t0, t1 = (m.router.table for m in mk.moe_layers(model))
    assert not torch.equal(t0, t1)
    from moebert_kernels.modules import routing_state

    calls = []
    real = routing_state.plans_from_expert_ids
    monkeypatch.setattr(routing_state, "plans_from_expert_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask = batch()
    logits(model, ids, mask)
    assert len(calls) == 1  # one batched plan build for all layers


def test_balanced_hash_router_patch_and_reload(tmp_path):
    model = tiny("bert")
    counts = torch.randint(0, 50, (120,))
    with pytest.raises(ValueError, match="token_counts"):
        mk.patch(model, num_experts=4, expert_size=24, shared=12, router="balanced_hash")
    mk.patch(model, num_experts=4, expert_size=24, shared=12, router="balanced_hash", token_counts=counts)
    ids, mask = batch()
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = mk.from_pretrained(str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids, mask), before, rtol=0, atol=0)


def test_importance_slicing_exact_indices():
    imp = torch.tensor([5.0, 9.0, 1.0, 7.0, 3.0, 8.0, 2.0, 6.0, 4.0, 0.0])
    # ranks: 1(9) 5(8) 3(7) 7(6) 0(5) 8(4) 4(3) 6(2) 2(1) 9(0)
    ids = mk.expert_neuron_ids(imp, 10, num_experts=2, expert_size=4, shared=2)
    assert ids.tolist() == [[1, 5, 3, 0], [1, 5, 7, 8]]
    assert mk.expert_neuron_ids(None, 10, 2, 4, 2).tolist() == [[0, 1, 2, 4], [0, 1, 3, 5]]


def test_patched_weights_are_the_expected_slices():
    model = tiny("bert")
    imp = torch.rand(L, FF)
    layer = model.bert.encoder.layer[1]
    w1, b1 = layer.intermediate.dense.weight.detach().clone(), layer.intermediate.dense.bias.detach().clone()
    w2, b2 = layer.output.dense.weight.detach().clone(), layer.output.dense.bias.detach().clone()
    mk.patch(model, num_experts=4, expert_size=24, shared=12, importance=imp)
    moe = model.bert.encoder.layer[1].output
    assert isinstance(moe, MoEFeedForward)
    ranked = torch.argsort(imp[1], descending=True)
    for e in range(4):
        want = torch.cat([ranked[:12], ranked[12 + e::4][:12]])
        assert torch.equal(moe.w1[e], w1[want]) and torch.equal(moe.b1[e], b1[want])
        assert torch.equal(moe.w2[e], w2[:, want]) and torch.equal(moe.b2[e], b2)


def test_default_sizes_fit_a_small_ffn():
    model = tiny("bert")  # d_ff = 64: the BERT-base sizes (768/512) would not fit
    mk.patch(model)
    moe = mk.moe_layers(model)[0]
    assert (moe.num_experts, moe.expert_size, model.config.moebert["shared"]) == (4, 16, 8)


def test_model_defaults_bert_base_sizes():
    cfg = BertConfig(vocab_size=64, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                     intermediate_size=3072)
    model = BertModel(cfg)
    mk.patch(model)
    moe = mk.moe_layers(model)[0]
    assert (moe.num_experts, moe.expert_size, moe.hidden_size) == (4, 768, 768)
    assert model.config.moebert["shared"] == 512


def test_inputs_embeds_with_hash_routing_says_what_to_do():
    model = tiny("bert")
    mk.patch(model, num_experts=4, expert_size=24, shared=12)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(2, 5, D))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(expert_size=FF + 1, shared=0), "larger than"),
    (dict(expert_size=24, shared=24), "smaller than"),
    (dict(expert_size=40, shared=12, num_experts=4), "too few neurons"),
    (dict(importance=torch.rand(L + 1, FF)), "importance"),
    (dict(importance=torch.rand(L, FF - 1)), "importance"),
    (dict(router="learned"), "router"),
    (dict(num_experts=0), "num_experts"),
    (dict(backend="tpu"), "backend"),
    (dict(seed="0"), "seed"),
    (dict(aux_loss_coef=-1.0, router="token_gate"), "aux_loss_coef"),
    (dict(aux_loss_coef=float("nan"), router="token_gate"), "aux_loss_coef"),
    (dict(aux_loss_coef=0.1), "gate"),
])
def test_bad_patch_arguments_leave_model_untouched(kwargs, msg):
    model = tiny("bert")
    args = dict(num_experts=4, expert_size=24, shared=12)
    args.update(kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config_class = type(model.config)
    with pytest.raises(ValueError, match=msg):
        mk.patch(model, **args)
    assert not mk.moe_layers(model) and "moebert" not in model.config.to_dict()
    assert type(model.config) is config_class and not model.bert._forward_pre_hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_unsupported_model_lists_supported():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50)
    with pytest.raises(ValueError, match="bert.*roberta.*distilbert"):
        mk.patch(transformers.GPT2Model(cfg))


def test_double_patch_rejected():
    model = tiny("bert")
    mk.patch(model, num_experts=4, expert_size=24, shared=12)
    with pytest.raises(ValueError, match="already patched"):
        mk.patch(model, num_experts=4, expert_size=24, shared=12)


def test_from_pretrained_rejects_dense_checkpoint(tmp_path):
    tiny("bert").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a MoEBERT checkpoint"):
        mk.from_pretrained(str(tmp_path))
