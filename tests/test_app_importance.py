"""Hook-based importance (one backward per batch) == the per-sample autograd.grad formula, fp64."""
import pytest
import torch
import torch.nn.functional as F

from moebert.importance import ffn_is_gated, ffn_linears, importance_scores, load_importance, save_importance


def _tiny(kind: str, num_labels: int = 3):
    import transformers as tr

    torch.manual_seed(0)
    if kind in ("modernbert", "deberta-v2"):
        common = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=32, num_labels=num_labels)
        if kind == "modernbert":  # gated GeGLU FFN; biases on so the w1 . grad terms need pre - b
            cfg = tr.ModernBertConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                      sep_token_id=2, mlp_bias=True, global_attn_every_n_layers=2,
                                      local_attention=8, **common)
            model = tr.ModernBertForSequenceClassification(cfg)
        else:
            model = tr.DebertaV2ForSequenceClassification(tr.DebertaV2Config(relative_attention=True,
                                                                              position_buckets=8, **common))
    elif kind == "distilbert":
        cfg = tr.DistilBertConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, hidden_dim=24,
                                  max_position_embeddings=32, num_labels=num_labels)
        model = tr.DistilBertForSequenceClassification(cfg)
    else:
        cfg = tr.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=32, num_labels=num_labels)
        model = (tr.BertForQuestionAnswering if kind == "qa" else tr.BertForSequenceClassification)(cfg)
    return model.double().eval()


def _batch(kind: str, num_labels: int, B: int = 5, S: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (B, S), generator=g)
    lengths = torch.tensor([S, S - 3, 4, S - 1, 2][:B])
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0 beyond each length
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "qa":
        batch["start_positions"] = torch.randint(0, 2, (B,), generator=g)
        batch["end_positions"] = batch["start_positions"] + 1
    elif num_labels == 1:
        batch["labels"] = torch.randn(B, generator=g, dtype=torch.float64)
    else:
        batch["labels"] = torch.randint(0, num_labels, (B,), generator=g)
    return batch


def _per_sample_reference(model, batches, num_labels):
    """I_j = sum_i |w1_j . dL_i/dw1_j + w2_j . dL_i/dw2_j| with one autograd.grad per example
    (gated: w1_j is two rows, j and d_ff + j)."""
    pairs = ffn_linears(model)
    d_ff = pairs[0][1].in_features
    gated = pairs[0][0].out_features == 2 * d_ff
    ref = torch.zeros(len(pairs), d_ff, dtype=torch.float64)
    weights = [w for fc1, fc2 in pairs for w in (fc1.weight, fc2.weight)]
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            out = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"])
            if "start_positions" in one:
                loss = (F.cross_entropy(out.start_logits, one["start_positions"])
                        + F.cross_entropy(out.end_logits, one["end_positions"])) / 2
            elif num_labels == 1:
                loss = F.mse_loss(out.logits.squeeze(-1), one["labels"])
            else:
                loss = F.cross_entropy(out.logits, one["labels"])
            grads = torch.autograd.grad(loss, weights)
            for l, (fc1, fc2) in enumerate(pairs):
                g1, g2 = grads[2 * l], grads[2 * l + 1]
                up = (fc1.weight * g1).sum(1)
                if gated:
                    up = up[:d_ff] + up[d_ff:]
                ref[l] += (up + (fc2.weight * g2).sum(0)).abs().detach()
    return ref


@pytest.mark.parametrize("kind,num_labels", [("bert", 3), ("bert", 1), ("distilbert", 2), ("qa", 2),
                                             ("modernbert", 3), ("deberta-v2", 2)])
def test_hook_importance_matches_per_sample_grad(kind, num_labels):
    model = _tiny(kind, num_labels)
    batches = [_batch(kind, num_labels, seed=1), _batch(kind, num_labels, B=3, S=6, seed=2)]
    got, n = importance_scores(model, batches)
    ref = _per_sample_reference(model, batches, num_labels)
    assert n == 8
    assert got.shape == ref.shape
    assert float(ref.abs().min()) >= 0 and float(ref.norm()) > 0
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-10, rel
    # The absolute value is per example: summing the products over the batch first gives less.
    assert all(p.grad is None for p in model.parameters()), "importance must not fill parameter .grad"


def test_importance_is_per_example_not_per_batch():
    """A batch-level |sum| (the wrong formula) is strictly smaller somewhere: the test can tell them apart."""
    model = _tiny("bert", 3)
    batch = _batch("bert", 3)
    got, _ = importance_scores(model, [batch])
    pairs = ffn_linears(model)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = F.cross_entropy(out.logits, batch["labels"], reduction="sum")
    grads = torch.autograd.grad(loss, [w for a, b in pairs for w in (a.weight, b.weight)])
    batch_level = torch.stack([((a.weight * grads[2 * l]).sum(1) + (b.weight * grads[2 * l + 1]).sum(0)).abs()
                               for l, (a, b) in enumerate(pairs)]).detach()
    assert bool((batch_level <= got + 1e-12).all())
    assert float((got - batch_level).max()) > 1e-6


def test_hooks_removed_and_mode_restored():
    model = _tiny("bert", 3).train()
    importance_scores(model, [_batch("bert", 3)])
    assert model.training
    for fc1, fc2 in ffn_linears(model):
        assert not fc1._forward_hooks and not fc2._forward_hooks


def test_save_load_roundtrip_and_shape_check(tmp_path):
    scores = torch.rand(2, 24, dtype=torch.float64)
    path = str(tmp_path / "imp.safetensors")
    save_importance(path, scores, {"task": "x"})
    back = load_importance(path, 2, 24)
    assert torch.allclose(back.double(), scores, rtol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(2, 24\).*\(6, 1536\)"):
        load_importance(path, 6, 1536)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors importance file"):
        load_importance(str(bad), 2, 24)


def test_gated_importance_sums_all_three_weight_groups():
    """Leaving out the g rows of Wi (an ungated formula on a gated FFN) must be told apart."""
    model = _tiny("modernbert", 3)
    assert ffn_is_gated(model) and not ffn_is_gated(_tiny("bert", 3))
    batch = _batch("modernbert", 3)
    got, _ = importance_scores(model, [batch])
    pairs = ffn_linears(model)
    assert got.shape == (2, 24) and tuple(pairs[0][0].weight.shape) == (48, 16)
    ref = _per_sample_reference(model, [batch], 3)
    assert float((got - ref).norm() / ref.norm()) < 1e-10
    weights = [w for fc1, fc2 in pairs for w in (fc1.weight, fc2.weight)]
    partial = torch.zeros_like(ref)
    for i in range(batch["input_ids"].shape[0]):
        out = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1])
        grads = torch.autograd.grad(F.cross_entropy(out.logits, batch["labels"][i:i + 1]), weights)
        for l, (fc1, fc2) in enumerate(pairs):
            partial[l] += ((fc1.weight * grads[2 * l]).sum(1)[:24] + (fc2.weight * grads[2 * l + 1]).sum(0)).abs()
    assert float((got - partial.detach()).abs().max()) > 1e-6
