"""``resize_token_embeddings`` on a hash-routed student: the tables follow the vocabulary. Kept ids keep their
experts, new ids get deterministic ones (hash: what a table drawn at the new size holds; balanced_hash:
round-robin, like unseen tokens), and the resized student saves and reloads through both loaders."""
import copy

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import moebert_kernels as mk
from moebert_kernels import HashRouter
from test_model_tools import patched
from test_patch import batch, logits

SEED, E, V = 3, 4, 120  # patched(): seed 3, 4 experts, tiny()'s vocabulary


def tables(model):
    return [m.router.table.clone() for m in mk.moe_layers(model)]


def new_entries(router, layer, start, stop):
    if router == "hash":
        return HashRouter(stop, E, seed=SEED + layer).table[start:]
    return torch.arange(start, stop) % E


def loaders(folder):
    yield "mk.from_pretrained", mk.from_pretrained(str(folder))
    yield "AutoModel", transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
@pytest.mark.parametrize("router", ["hash", "balanced_hash"])
def test_grown_vocabulary_routes_new_ids_and_survives_save_and_reload(kind, router, tmp_path):
    model = patched(kind, router).eval()
    before = tables(model)
    model.resize_token_embeddings(V + 8)
    ids, mask = batch()
    ids[0, 1:4] = torch.tensor([V, V + 3, V + 7])  # new tokens, e.g. added special tokens
    want = logits(model, ids, mask)  # routes without "outside the vocabulary"
    for layer, (old, m) in enumerate(zip(before, mk.moe_layers(model))):
        assert m.router.vocab_size == V + 8 and torch.equal(m.router.table[:V], old)
        assert torch.equal(m.router.table[V:], new_entries(router, layer, V, V + 8))
    model.save_pretrained(tmp_path)
    for name, loaded in loaders(tmp_path):
        assert loaded.config.vocab_size == V + 8, name
        for a, b in zip(mk.moe_layers(model), mk.moe_layers(loaded)):
            assert torch.equal(a.router.table, b.router.table), name
        torch.testing.assert_close(logits(loaded, ids, mask), want, rtol=0, atol=0, msg=name)


def test_new_ids_get_the_same_experts_whatever_the_resize_history():
    once, twice = patched("bert"), patched("bert")
    once.resize_token_embeddings(V + 8)
    once.state_dict()  # the tables follow at the next forward or state_dict
    twice.resize_token_embeddings(V + 3)
    twice(input_ids=torch.tensor([[V + 2]]))
    twice.resize_token_embeddings(V + 8)
    copied = copy.deepcopy(twice)  # a copy made before the tables followed follows too
    for t in (twice, copied):
        t(input_ids=torch.tensor([[V + 7]]))
        for a, b in zip(tables(once), tables(t)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("router", ["hash", "balanced_hash"])
def test_shrunk_vocabulary_saves_reloads_and_rejects_dropped_ids(router, tmp_path):
    model = patched("bert", router).eval()
    before = tables(model)
    model.resize_token_embeddings(V - 20)
    model.save_pretrained(tmp_path)  # no forward first: saving takes the tables along
    assert all(t.shape == (V - 20,) for t in load_file(tmp_path / "model.safetensors").values()
               if t.dtype == torch.int64 and t.dim() == 1)
    ids, mask = batch()
    ids = ids.clamp_max(V - 21)
    want = logits(model, ids, mask)
    for name, loaded in loaders(tmp_path):
        torch.testing.assert_close(logits(loaded, ids, mask), want, rtol=0, atol=0, msg=name)
        with pytest.raises(ValueError, match=rf"token id {V - 10} is outside the vocabulary \[0, {V - 20}\)"):
            loaded(input_ids=torch.tensor([[5, V - 10]]))
    model.resize_token_embeddings(V)  # and back: kept ids as before, the others as new ids
    model(input_ids=torch.tensor([[5]]))
    for layer, (old, now) in enumerate(zip(before, tables(model))):
        assert torch.equal(now[:V - 20], old[:V - 20])
        assert torch.equal(now[V - 20:], new_entries(router, layer, V - 20, V))


@pytest.mark.parametrize("ignore", [False, True])
def test_tables_that_do_not_cover_the_vocabulary_never_load(ignore, tmp_path):
    # A checkpoint saved after resize_token_embeddings by a version whose tables did not follow it.
    model = patched("bert", "balanced_hash")
    model.resize_token_embeddings(V + 8)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v[:V].clone() if k.endswith("router.table") else v for k, v in state.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    msg = rf"hash tables cover {V} token ids but config.vocab_size is {V + 8}.*resize_token_embeddings"
    with pytest.raises(ValueError, match=msg):  # never fresh (balanced_hash: all-zero) tables
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=ignore)
    with pytest.raises(ValueError, match=msg):
        mk.from_pretrained(str(tmp_path))
