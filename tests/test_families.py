"""patch() on every supported family, at the level users call it: whole tiny random HF models."""
import contextlib
import copy

import pytest
import torch
import transformers as tf

import moebert_kernels as mk
from moebert_kernels.hf.patch import SUPPORTED_MODEL_TYPES

D, FF, L, V = 32, 64, 2, 120


def _config(family: str):
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF,
                  num_labels=3)
    if family == "bert":
        return tf.BertConfig(max_position_embeddings=64, **common)
    if family in ("roberta", "xlm-roberta", "camembert"):
        cls = {"roberta": tf.RobertaConfig, "xlm-roberta": tf.XLMRobertaConfig, "camembert": tf.CamembertConfig}
        return cls[family](max_position_embeddings=70, pad_token_id=1, **common)
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=V, dim=D, n_layers=L, n_heads=4, hidden_dim=FF,
                                   max_position_embeddings=64, num_labels=3)
    if family == "deberta-v2":  # v3-style: relative attention with log buckets, shared keys
        return tf.DebertaV2Config(max_position_embeddings=64, relative_attention=True, position_buckets=16,
                                  pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
                                  max_relative_positions=-1, position_biased_input=False, **common)
    if family == "electra":
        return tf.ElectraConfig(embedding_size=16, max_position_embeddings=64, **common)
    if family == "modernbert":
        return tf.ModernBertConfig(max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                   hidden_activation="gelu", **common)
    raise KeyError(family)


_PREFIX = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert", "deberta-v2": "DebertaV2",
           "electra": "Electra", "xlm-roberta": "XLMRoberta", "camembert": "Camembert", "modernbert": "ModernBert"}
FAMILIES = list(_PREFIX)
HEADS = ["Model", "ForSequenceClassification", "ForMaskedLM", "ForTokenClassification"]


def tiny(family: str, head: str = "ForSequenceClassification"):
    torch.manual_seed(torch.seed() % 2**31)
    model = getattr(tf, _PREFIX[family] + head)(_config(family)).eval()
    with torch.no_grad():  # make norms and biases non-trivial so every copy is checked
        for n, p in model.named_parameters():
            if "norm" in n.lower():
                p.uniform_(0.5, 1.5) if n.endswith("weight") else p.normal_(0, 0.1)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def batch(B=3, S=9):
    ids = torch.randint(3, V, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def assert_rel(got, want, tol=1e-5, name="", floor=1e-30):
    """Norm-wise relative error (the denominator at least ``floor``): fp32 rounding stays far below
    ``tol``, a wrong weight or routing is O(1)."""
    err = float((got.double() - want.double()).norm() / max(float(want.double().norm()), floor))
    assert err < tol, f"{name}: relative error {err:.3g}"


def out_of(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_table_covers_the_eight_families():
    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_one_full_expert_equals_stock_forward_and_backward(family, head):
    if head == "ForMaskedLM" and family == "electra":
        head = "ForPreTraining"
    dense = tiny(family, head)
    moe = copy.deepcopy(dense)
    mk.patch(moe, num_experts=1, expert_size=FF, shared=0)
    assert len(mk.moe_layers(moe)) == L
    ids, mask = batch()
    y_dense, y_moe = out_of(dense, ids, mask), out_of(moe, ids, mask)
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y_dense)
    (y_dense * dy).sum().backward()
    (y_moe * dy).sum().backward()
    grads = {n: p.grad for n, p in moe.named_parameters()}
    # Some grads are zero up to rounding (attention key biases), so relative to the largest one.
    floor = 1e-3 * max(float(p.grad.norm()) for p in dense.parameters() if p.grad is not None)
    compared = 0
    for n, p in dense.named_parameters():
        if n in grads and p.grad is not None:
            assert_rel(grads[n], p.grad, 1e-4, name=n, floor=floor)
            compared += 1
    assert compared > 5
    # The one expert's weights are the dense FFN's (in order: no importance), so their grads are too.
    base = getattr(dense, "base_model", dense)
    from moebert_kernels.hf.patch import _get, family_of
    fam = family_of(family)
    for layer, m in zip(_get(base, fam.layers), mk.moe_layers(moe)):
        ffn = fam.style.read(layer)
        assert_rel(m.w1.grad[0], ffn.w1.grad, name="w1")
        assert_rel(m.w2.grad[0], ffn.w2.grad, name="w2")
        if ffn.b2 is not None:
            assert_rel(m.b1.grad[0], ffn.b1.grad, name="b1")
            assert_rel(m.b2.grad[0], ffn.b2.grad, name="b2")
        if ffn.ln_weight is not None:
            assert_rel(m.ln_weight.grad[0], ffn.ln_weight.grad, name="ln_weight")
            assert_rel(m.ln_bias.grad[0], ffn.ln_bias.grad, name="ln_bias")


@pytest.mark.parametrize("family", FAMILIES)
def test_four_experts_forward_backward_and_save_load(family, tmp_path):
    model = tiny(family)
    mk.patch(model, num_experts=4, expert_size=24, shared=12, importance=torch.rand(L, FF), seed=3)
    model.train()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for m in mk.moe_layers(model):
        assert m.w1.grad is not None and m.w1.grad.abs().sum() > 0 and m.w2.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        before = out_of(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = mk.from_pretrained(str(tmp_path))
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(out_of(loaded, ids, mask), before, rtol=0, atol=0)
    for a, b in zip(mk.moe_layers(model), mk.moe_layers(loaded)):
        assert torch.equal(a.router.table, b.router.table)
    auto = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()  # the Auto* route
    assert auto.config.model_type == f"moebert_kernels_{family}" and len(mk.moe_layers(auto)) == L
    with torch.no_grad():
        torch.testing.assert_close(out_of(auto, ids, mask), before, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_equals_untied_after_conversion_then_trains_and_reloads(family, tmp_path):
    """tie_shared on every family (gated and bias-free ModernBERT included): the same function as the copied
    layout right after conversion, half the shared weights, then a train step and an exact reload."""
    dense = tiny(family).double()
    imp = torch.rand(L, FF)
    untied, tied = copy.deepcopy(dense), copy.deepcopy(dense)
    mk.patch(untied, num_experts=4, expert_size=24, shared=12, importance=imp, seed=3)
    mk.patch(tied, num_experts=4, expert_size=24, shared=12, importance=imp, seed=3, tie_shared=True)
    gated = family == "modernbert"
    for m in mk.moe_layers(tied):
        assert m.shared_size == 12 and tuple(m.shared_w1.shape) == ((24 if gated else 12), D)
        assert tuple(m.w1.shape) == (4, (24 if gated else 12), D) and (m.shared_b1 is None) == gated
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(out_of(tied, ids, mask), out_of(untied, ids, mask), rtol=1e-12, atol=1e-12)
    tied.train()
    tied(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
    for m in mk.moe_layers(tied):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (m.shared_w1, m.shared_w2, m.w1))
    tied.eval()
    with torch.no_grad():
        before = out_of(tied, ids, mask)
    tied.save_pretrained(tmp_path)
    auto = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval().double()
    assert all(m.shared_size == 12 for m in mk.moe_layers(auto)) and auto.config.moebert["tie_shared"] is True
    with torch.no_grad():  # (DeBERTa's fp64 attention differs from run to run in the last bit)
        torch.testing.assert_close(out_of(auto, ids, mask), before, rtol=1e-12, atol=1e-14)


def test_modernbert_tied_shared_ffn_holds_the_a_and_g_rows_of_the_top_neurons():
    """A gated neuron j is rows j and I+j of Wi with column j of Wo; with mlp_bias the biases follow."""
    cfg = _config("modernbert")
    cfg.mlp_bias = True
    model = tf.ModernBertModel(cfg).eval()
    imp = torch.rand(L, FF)
    layer = model.layers[1]
    wi, bi, wo = (t.detach().clone() for t in (layer.mlp.Wi.weight, layer.mlp.Wi.bias, layer.mlp.Wo.weight))
    bo = layer.mlp.Wo.bias.detach().clone()
    mk.patch(model, num_experts=4, expert_size=24, shared=12, importance=imp, tie_shared=True)
    moe = model.layers[1].mlp
    ranked = torch.argsort(imp[1], descending=True)
    top = ranked[:12]
    assert torch.equal(moe.shared_w1, wi[torch.cat([top, top + FF])])
    assert torch.equal(moe.shared_b1, bi[torch.cat([top, top + FF])])
    assert torch.equal(moe.shared_w2, wo[:, top])
    for e in range(4):
        own = ranked[12 + e::4][:12]
        assert torch.equal(moe.w1[e], wi[torch.cat([own, own + FF])]) and torch.equal(moe.w2[e], wo[:, own])
        assert torch.equal(moe.b1[e], bi[torch.cat([own, own + FF])]) and torch.equal(moe.b2[e], bo)


@pytest.mark.parametrize("family", ["modernbert", "deberta-v2"])
@pytest.mark.parametrize("router", ["token_gate", "sentence_gate"])
def test_learned_gates_train_and_reload(family, router, tmp_path):
    model = tiny(family)
    mk.patch(model, num_experts=4, expert_size=24, shared=12, router=router)
    model.train()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    (out.loss + mk.aux_loss(model)).backward()
    assert all(m.router.proj.weight.grad is not None for m in mk.moe_layers(model))
    model.eval()
    with torch.no_grad():
        before = out_of(model, ids, mask)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(out_of(mk.from_pretrained(str(tmp_path)), ids, mask), before, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_patched_model_compiles_fullgraph(family):
    torch._dynamo.reset()
    model = tiny(family)
    mk.patch(model, num_experts=4, expert_size=24, shared=12)
    ids, mask = batch()
    with torch.no_grad():
        want = out_of(model, ids, mask)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = out_of(compiled, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert all(m.w1.grad is not None for m in mk.moe_layers(model))


def test_deberta_layer_norm_eps_is_read_from_the_model():
    model = tiny("deberta-v2")
    eps = model.deberta.encoder.layer[0].output.LayerNorm.eps
    assert eps == 1e-7
    mk.patch(model, num_experts=2, expert_size=32, shared=0)
    assert all(m.layer_norm_eps == eps for m in mk.moe_layers(model))


def test_unsupported_model_lists_every_family():
    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50)
    with pytest.raises(ValueError) as err:
        mk.patch(tf.GPT2Model(cfg))
    for fam in FAMILIES:
        assert repr(fam) in str(err.value)
    assert "ModernBertModel" in str(err.value) and "DebertaV2Model" in str(err.value)


# ---- ModernBERT: gated pre-norm MLP ------------------------------------------------------------

@contextlib.contextmanager
def model_call(model, ids, mask):
    """What the base model's hooks do around a forward: inside, the layers route by this call's plans."""
    from moebert_kernels.hf.patch import _begin_batch, _end_batch

    _begin_batch(model.base_model, (), {"input_ids": ids, "attention_mask": mask})
    try:
        yield
    finally:
        _end_batch(model.base_model, (), None)


def test_modernbert_layer_with_one_expert_equals_the_stock_gated_mlp():
    model = tiny("modernbert", "Model")
    layer = model.layers[1]
    stock_mlp, stock_layer = copy.deepcopy(layer.mlp), copy.deepcopy(layer)
    mk.patch(model, num_experts=1, expert_size=FF, shared=0)
    moe = layer.mlp
    assert isinstance(moe, mk.MoEFeedForward) and moe.activation == "geglu"
    assert moe.b1 is None and moe.b2 is None and moe.ln_weight is None  # no biases, no per-expert norm
    assert tuple(moe.w1.shape) == (1, 2 * FF, D) and tuple(moe.w2.shape) == (1, D, FF)
    assert isinstance(layer.mlp_norm, torch.nn.LayerNorm)  # the shared pre-norm stays the model's
    ids, mask = batch()
    x = torch.randn(3, 9, D, requires_grad=True)
    with model_call(model, ids, mask):
        torch.testing.assert_close(moe(x), stock_mlp(x), rtol=1e-5, atol=1e-6)
    # The whole layer: h + mlp(mlp_norm(h)) with the residual and norm outside the MoE.
    if hasattr(model, "rotary_emb"):  # transformers 5: rotary embeddings come from the model
        pos = model.rotary_emb(x, torch.arange(9)[None], layer.attention_type)
        run = lambda m: m(x, attention_mask=None, position_embeddings=pos)  # noqa: E731
    else:  # transformers 4.x: each layer rotates from position_ids and returns a tuple
        run = lambda m: m(x, position_ids=torch.arange(9)[None])[0]  # noqa: E731
    with model_call(model, ids, mask):
        torch.testing.assert_close(run(layer), run(stock_layer), rtol=1e-5, atol=1e-6)


def test_modernbert_unpadded_hidden_states_route_by_the_kept_tokens_ids():
    """transformers 4.x's FlashAttention path unpads to [total_nnz, d] with indices = nonzero(mask);
    the MLP then sees only the kept rows. Their experts must be those of the kept tokens' ids."""
    model = tiny("modernbert", "Model")
    mk.patch(model, num_experts=4, expert_size=16, shared=4, seed=5)
    ids, mask = batch()
    mask[2, 3:] = 0
    layer = model.layers[0]
    table = layer.mlp.router.table
    # Kept row 2's ids (flat 18..20) land where the first total_nnz ids would put dropped row 1's
    # (flat 15..17); give them other experts so routing by the wrong ids cannot pass by chance.
    flat = ids.view(-1)
    for wrong, kept in zip(range(15, 18), range(18, 21)):
        flat[kept] = next(i for i in range(3, V) if table[i] != table[flat[wrong]])
    hidden = torch.randn(3, 9, D)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()  # as HF's _unpad_modernbert_input
    unpadded = hidden.reshape(-1, D)[indices]
    with model_call(model, ids, mask):
        padded_out = hidden + layer.mlp(layer.mlp_norm(hidden))
        unpadded_out = unpadded + layer.mlp(layer.mlp_norm(unpadded))
    torch.testing.assert_close(unpadded_out, padded_out.reshape(-1, D)[indices], rtol=1e-6, atol=1e-6)
    # Routing the first total_nnz ids instead (ignoring the mask) gives other experts.
    assert not torch.equal(table[ids.flatten()[:len(indices)]], table[ids.flatten()[indices]])


def test_modernbert_unpadded_without_a_mask_says_what_is_wrong():
    model = tiny("modernbert", "Model")
    mk.patch(model, num_experts=4, expert_size=16, shared=4)
    ids, _ = batch()
    with model_call(model, ids, None), \
            pytest.raises(ValueError, match="routing plan covers 27 tokens but hidden_states has 20"):
        model.layers[0].mlp(torch.randn(20, D))


# ---- GPU: the patched families on CUDA through the automatic dispatch ---------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is present")
@pytest.mark.parametrize("family", ["modernbert", "deberta-v2", "bert"])
@pytest.mark.parametrize("tie_shared", [False, True], ids=["copied", "tied"])
def test_patched_family_on_cuda_matches_the_torch_backend(family, tie_shared):
    """The patched model on CUDA through the automatic dispatch and forced to the CUDA C++ backend (gated,
    bias-free ModernBERT experts and the tied shared expert included) against the torch backend."""
    pytest.importorskip("triton")
    from moebert_kernels.ops import select_backend
    from moebert_kernels.ops.moe_ffn import needed_features

    model = tiny(family).cuda()
    mk.patch(model, num_experts=4, expert_size=24, shared=12, tie_shared=tie_shared)
    moe = mk.moe_layers(model)[0]
    needs = needed_features(moe.b1, moe.b2, moe.activation)
    assert select_backend("moe_ffn", "cuda", needs=needs) in ("triton", "cuda")
    ids, mask = (t.cuda() for t in batch(B=4, S=33))
    runs = []
    for backend in ("torch", None, "cuda"):  # the same model: the reference backend first
        for m in mk.moe_layers(model):
            m.backend = backend
        model.zero_grad()
        y = out_of(model, ids, mask)
        y.square().sum().backward()
        runs.append((y.detach(), [(m.w1.grad.clone(), m.w2.grad.clone()) for m in mk.moe_layers(model)]))
    y_ref, grads_ref = runs[0]
    for y, grads in runs[1:]:
        torch.testing.assert_close(y, y_ref, rtol=2e-4, atol=2e-4)
        for (a1, a2), (b1, b2) in zip(grads, grads_ref):
            torch.testing.assert_close(a1, b1, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(a2, b2, rtol=1e-3, atol=1e-4)
