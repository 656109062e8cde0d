"""patch(..., tie_shared=True): the shared neurons stored once, as a shared FFN every token runs."""
import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

import moebert_kernels as mk
from moebert_kernels import MoEFeedForward
from test_patch import FF, L, batch, logits, tiny

E, H, S = 4, 24, 12  # 4 experts of 24 neurons, 12 of them shared
ROUTER_ARGS = {"hash": {}, "balanced_hash": {"token_counts": torch.arange(120) % 17},
               "token_gate": {}, "sentence_gate": {}}


def patched_pair(kind, router, importance, dtype=torch.float32):
    dense = tiny(kind).to(dtype)
    models = []
    for tie in (False, True):
        m = copy.deepcopy(dense)
        mk.patch(m, num_experts=E, expert_size=H, shared=S, importance=importance, router=router, seed=3,
                 tie_shared=tie, **ROUTER_ARGS[router])
        models.append(m)
    for a, b in zip(*map(mk.moe_layers, models)):  # gates start random: give both layouts the same one
        b.router.load_state_dict(a.router.state_dict())
    return models


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("router", list(ROUTER_ARGS))
def test_tied_equals_untied_right_after_conversion(kind, router):
    untied, tied = patched_pair(kind, router, torch.rand(L, FF), torch.float64)
    ids, mask = batch()
    a, b = logits(untied, ids, mask), logits(tied, ids, mask)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # and the layouts really differ: the shared neurons are stored once
    assert all(m.shared_size == 0 and m.w1.shape == (E, H, 32) for m in mk.moe_layers(untied))
    assert all(m.shared_size == S and m.w1.shape == (E, H - S, 32) for m in mk.moe_layers(tied))


def test_tied_equals_untied_in_fp32():
    untied, tied = patched_pair("bert", "hash", torch.rand(L, FF))
    ids, mask = batch()
    torch.testing.assert_close(logits(tied, ids, mask), logits(untied, ids, mask), rtol=1e-5, atol=1e-6)


def test_tied_weights_are_the_expected_slices():
    model = tiny("bert")
    imp = torch.rand(L, FF)
    layer = model.bert.encoder.layer[1]
    w1, b1 = layer.intermediate.dense.weight.detach().clone(), layer.intermediate.dense.bias.detach().clone()
    w2, b2 = layer.output.dense.weight.detach().clone(), layer.output.dense.bias.detach().clone()
    lnw = layer.output.LayerNorm.weight.detach().clone()
    mk.patch(model, num_experts=E, expert_size=H, shared=S, importance=imp, tie_shared=True)
    moe = model.bert.encoder.layer[1].output
    ranked = torch.argsort(imp[1], descending=True)
    top = ranked[:S]
    assert torch.equal(moe.shared_w1, w1[top]) and torch.equal(moe.shared_b1, b1[top])
    assert torch.equal(moe.shared_w2, w2[:, top])
    for e in range(E):
        own = ranked[S + e::E][:H - S]
        assert torch.equal(moe.w1[e], w1[own]) and torch.equal(moe.b1[e], b1[own])
        assert torch.equal(moe.w2[e], w2[:, own]) and torch.equal(moe.b2[e], b2)
        assert torch.equal(moe.ln_weight[e], lnw)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
@pytest.mark.parametrize("router", ["hash", "balanced_hash", "token_gate"])
def test_train_step_and_save_load(kind, router, tmp_path):
    _, model = patched_pair(kind, router, None)
    model.train()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    (out.loss + (mk.aux_loss(model) if "gate" in router else 0)).backward()
    for m in mk.moe_layers(model):
        for p in (m.shared_w1, m.shared_b1, m.shared_w2, m.w1):
            assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    before = logits(model, ids, mask)
    assert model.config.moebert["tie_shared"] is True
    model.save_pretrained(tmp_path)
    loaded = mk.from_pretrained(str(tmp_path))
    assert loaded.config.moebert == model.config.moebert
    assert all(m.shared_size == S for m in mk.moe_layers(loaded))
    torch.testing.assert_close(logits(loaded, ids, mask), before, rtol=0, atol=0)
    if router != "balanced_hash":  # on main, Auto-loading a balanced_hash student fails for either layout
        auto = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()  # the Auto classes patch
        assert all(m.shared_size == S for m in mk.moe_layers(auto))
        torch.testing.assert_close(logits(auto, ids, mask), before, rtol=0, atol=0)


def test_shared_zero_is_the_untied_layout():
    dense = tiny("bert")
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    mk.patch(a, num_experts=E, expert_size=16, shared=0)
    mk.patch(b, num_experts=E, expert_size=16, shared=0, tie_shared=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_bert_base_ffn_parameters_halve():
    with torch.device("meta"):
        dense = BertModel(BertConfig())
    untied, tied = copy.deepcopy(dense), copy.deepcopy(dense)
    mk.patch(untied, num_experts=4, expert_size=768, shared=512)
    mk.patch(tied, num_experts=4, expert_size=768, shared=512, tie_shared=True)
    d, layers = 768, 12
    neurons = lambda model: sum(  # noqa: E731
        p.shape[-2] * p.shape[0] if n.endswith(".w1") else p.shape[0]
        for n, p in model.named_parameters() if n.endswith((".w1", ".shared_w1")))
    assert neurons(untied) == layers * 3072  # 4 x 768: as many as the dense FFN
    assert neurons(tied) == layers * 1536  # 512 + 4 x 256: half
    ffn = lambda model: sum(p.numel() for n, p in model.named_parameters()  # noqa: E731
                            if ".w1" in n or ".w2" in n or ".b1" in n or "shared_" in n)
    assert ffn(tied) * 2 == ffn(untied) == layers * (2 * 3072 * d + 3072)
    # total: 109.5M dense, 109.6M untied, 81.2M tied (b2 and the LayerNorms stay per expert)
    assert _count(untied) == _count(dense) + layers * 3 * (d + 2 * d)
    assert _count(tied) == _count(untied) - layers * (2 * 1536 * d + 1536)
    assert (_count(dense), _count(untied), _count(tied)) == (109_482_240, 109_565_184, 81_235_200)


def test_module_compiles_fullgraph_with_backward():
    m = MoEFeedForward(16, 8, 4, router=mk.HashRouter(50, 4, seed=0), dropout=0.0, shared_size=6)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ids = torch.randint(0, 50, (2, 5))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = compiled(x, input_ids=ids)
    want = m(x, input_ids=ids)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got.square().sum(), [x, m.shared_w1, m.w1])
    g2 = torch.autograd.grad(want.square().sum(), [x, m.shared_w1, m.w1])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_whole_tied_model_compiles_fullgraph():
    _, model = patched_pair("bert", "hash", None)
    ids, mask = batch()
    want = logits(model, ids, mask)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_module_load_dense_checks_the_shared_ids():
    m = MoEFeedForward(8, 4, 2, dropout=0.0, shared_size=2)
    w1, b1, w2, b2 = torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    ln = (torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match="same for every expert"):
        m.load_dense(w1, b1, w2, b2, *ln, torch.tensor([[0, 1, 2, 3, 4, 5], [0, 7, 8, 9, 10, 11]]))
    with pytest.raises(ValueError, match=r"\[E, s \+ h\]"):
        m.load_dense(w1, b1, w2, b2, *ln, torch.tensor([[0, 1, 2, 3], [0, 1, 8, 9]]))
    with pytest.raises(ValueError, match="shared_size"):
        MoEFeedForward(8, 4, 2, shared_size=-1)


def test_bad_tie_shared_leaves_model_untouched():
    model = tiny("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="tie_shared"):
        mk.patch(model, num_experts=E, expert_size=H, shared=S, tie_shared="yes")
    assert not mk.moe_layers(model) and "moebert" not in model.config.to_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
