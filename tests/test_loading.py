"""Loading a saved student is exact or it fails: every route people use (Auto*, pipeline(), the stock class
named in config.architectures, moebert_kernels.from_pretrained), with and without ``import moebert_kernels``,
and a clear error naming the fix for every config a user may have edited by hand."""
import json

import pytest
import torch
import transformers

import moebert_kernels as mk
import test_families as families
from test_model_tools import patched, run_python
from test_patch import batch, logits

ROUTERS = ["hash", "balanced_hash", "token_gate", "sentence_gate"]


def save_student(folder, router="hash", tie_shared=False, kind="bert"):
    """A tiny student saved with a tokenizer (so pipeline() can open the folder); returns the model."""
    model = patched(kind, router, tie_shared=tie_shared).eval()
    model.save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]))
    transformers.BertTokenizerFast(str(vocab)).save_pretrained(folder)
    return model


def edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_every_router_student_loads_exactly_through_auto_and_pipeline_in_a_fresh_process(tmp_path):
    students = {}
    ids, mask = batch()
    for router in ROUTERS:
        for tie in (False, True):
            folder = tmp_path / f"{router}-{'tied' if tie else 'untied'}"
            model = save_student(folder, router, tie)
            students[str(folder)] = logits(model, ids, mask)
    torch.save({"ids": ids, "mask": mask, "logits": students}, tmp_path / "io.pt")
    # Weights and tables must be the saved ones bit for bit; outputs across processes agree to fp32 rounding
    # (a fresh process lays memory out differently; a wrong expert or table is O(1e-2)).
    run_python(f"""
        import torch, transformers
        from safetensors.torch import load_file
        import moebert_kernels as mk
        io = torch.load({str(tmp_path / "io.pt")!r})
        for folder, want in io["logits"].items():
            saved = load_file(folder + "/model.safetensors")
            routes = {{
                "AutoModelForSequenceClassification":
                    transformers.AutoModelForSequenceClassification.from_pretrained(folder),
                "pipeline": transformers.pipeline("text-classification", model=folder).model,
                "mk.from_pretrained": mk.from_pretrained(folder),
            }}
            for name, m in routes.items():
                assert len(mk.moe_layers(m)) == 2, (folder, name, type(m))
                state = m.state_dict()
                for k, v in saved.items():
                    assert torch.equal(state[k], v), (folder, name, k)
                with torch.no_grad():
                    got = m.eval()(input_ids=io["ids"], attention_mask=io["mask"]).logits
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{{folder}} {{name}}")
            print("ok", folder)
    """, env={"HF_HUB_OFFLINE": "1"})


STOCK_ROUTES = {
    "BertForSequenceClassification": "transformers.BertForSequenceClassification.from_pretrained(folder)",
    "BertModel": "transformers.BertModel.from_pretrained(folder)",
    "AutoModel": "transformers.AutoModel.from_pretrained(folder)",
    "pipeline": "transformers.pipeline('text-classification', model=folder)",
}


@pytest.mark.parametrize("imported", [False, True], ids=["without-import", "with-import"])
def test_no_route_gives_a_dense_model_with_random_ffns(imported, tmp_path):
    cases = []  # (folder, loading code, text the error must hold)
    for router in ("balanced_hash", "token_gate"):
        save_student(tmp_path / router, router)
        for name, code in STOCK_ROUTES.items():
            if not imported or name.startswith("Bert"):  # with the import, Auto* and pipeline() load it
                cases.append((str(tmp_path / router), code, "moebert_kernels"))
    if imported:
        # A student the MoE classes refuse (config.moebert edited): pipeline() then tries the stock class
        # named in config.architectures, which must fail too (transformers passes on its error alone).
        save_student(tmp_path / "edited", "hash")
        edit_config(tmp_path / "edited", lambda cfg: cfg["moebert"].update(tie_shared=True))
        cases.append((str(tmp_path / "edited"), STOCK_ROUTES["AutoModel"], "tie_shared"))
        cases.append((str(tmp_path / "edited"), STOCK_ROUTES["pipeline"], "those say why"))
    r = run_python(f"""
        import transformers
        {"import moebert_kernels" if imported else ""}
        for folder, code, expected in {cases!r}:
            try:
                eval(code)
            except Exception as e:
                assert expected in str(e), (folder, code, str(e)[-3000:])
                print("refused", folder, code)
            else:
                raise AssertionError(f"{{code}} loaded {{folder}} without an error")
    """, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    assert r.stdout.count("refused") == len(cases), r.stdout


def test_the_stock_class_error_says_how_to_load_the_student(tmp_path):
    save_student(tmp_path, "hash")
    with pytest.raises(Exception, match=r"import moebert_kernels.*AutoModel\*\.from_pretrained"):
        transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).hidden_act == "gelu"  # the MoE config reads it back


@pytest.mark.parametrize("family", families.FAMILIES)
def test_no_family_loads_as_a_dense_model_through_its_stock_class(family, tmp_path):
    model = families.tiny(family)
    mk.patch(model, num_experts=4, expert_size=24, shared=12, router="hash")
    model.save_pretrained(tmp_path)
    stock = getattr(transformers, families._PREFIX[family] + "ForSequenceClassification")
    with pytest.raises(Exception, match="import moebert_kernels"):
        stock.from_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = families.batch()
    with torch.no_grad():
        torch.testing.assert_close(families.out_of(loaded, ids, mask), families.out_of(model.eval(), ids, mask),
                                   rtol=0, atol=0)


# -- a config.moebert edited by hand -----------------------------------------------------------
def _load_auto(folder):
    return transformers.AutoModelForSequenceClassification.from_pretrained(folder)


def _load_mk(folder):
    return mk.from_pretrained(str(folder))


LOADERS = {"auto": _load_auto, "mk": _load_mk}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("edit, msg", [
    (lambda c: c["moebert"].update(num_expert=4), r"unknown field\(s\) \['num_expert'\]"),
    (lambda c: c["moebert"].update(activation="bogus"), r"config.moebert\['activation'\] must be one of"),
    (lambda c: c["moebert"].update(activation="relu"), r"'relu' but the model's hidden_act='gelu'.*set it back"),
    (lambda c: c["moebert"].update(router="hashh"), r"config.moebert\['router'\] must be one of"),
    (lambda c: c["moebert"].update(tie_shared=True), r"tie_shared'\] is true but the checkpoint's experts are "
                                                     r"untied.*set tie_shared back to false"),
    (lambda c: c["moebert"].update(num_experts=3), r"must hold what patch\(\) wrote"),
], ids=["unknown-field", "bogus-activation", "other-activation", "bad-router", "flipped-tie", "num-experts"])
def test_an_edited_config_moebert_is_a_clear_error(loader, edit, msg, tmp_path):
    save_student(tmp_path, "hash")
    edit_config(tmp_path, edit)
    with pytest.raises(ValueError, match=msg):
        LOADERS[loader](tmp_path)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_tied_student_with_tie_shared_flipped_off_names_it(loader, tmp_path):
    save_student(tmp_path, "hash", tie_shared=True)
    edit_config(tmp_path, lambda c: c["moebert"].update(tie_shared=False))
    with pytest.raises(ValueError, match=r"tie_shared'\] is false but the checkpoint's experts are tied"):
        LOADERS[loader](tmp_path)


def test_ignore_mismatched_sizes_still_loads_a_new_head_but_never_new_experts(tmp_path):
    model = save_student(tmp_path, "balanced_hash")
    edit_config(tmp_path, lambda c: c.update(id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True"):
        _load_auto(tmp_path)
    fresh_head = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path,
                                                                                ignore_mismatched_sizes=True)
    assert fresh_head.classifier.out_features == 2
    for a, b in zip(mk.moe_layers(model), mk.moe_layers(fresh_head)):
        assert torch.equal(a.router.table, b.router.table) and torch.equal(a.w1, b.w1)
    # experts of another size cannot be "ignored" into fresh random ones
    edit_config(tmp_path, lambda c: c["moebert"].update(expert_size=20))
    with pytest.raises(ValueError, match="must hold what patch"):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


# -- a mistyped local folder is not sent to the hub -------------------------------------------
@pytest.mark.parametrize("path", ["students/studnet", "./studnet", "../studnet", "~/no-such-studnet-xyz", "ABS"])
def test_from_pretrained_a_mistyped_local_folder_says_no_such_folder(path, tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "students").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: pytest.fail(f"{path} was sent to the hub"))
    path = str(tmp_path / "studnet") if path == "ABS" else path
    with pytest.raises(FileNotFoundError, match=f"no such folder: .*studnet"):
        mk.from_pretrained(path)


def test_from_pretrained_a_hub_id_goes_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **k: calls.append(repo) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        mk.from_pretrained("someone/student")
    assert calls == ["someone/student"]


# -- token ids past the table ------------------------------------------------------------------
def test_token_ids_past_the_table_under_torch_compile_get_the_vocabulary_error():
    model = patched("bert", "hash").eval()
    compiled = torch.compile(model)
    ids, mask = batch(B=2, S=5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits, logits(model, ids, mask))
        ids[1, 2] = 125
        with pytest.raises(RuntimeError, match=r"outside the vocabulary \[0, 120\).*resize_token_embeddings"):
            compiled(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"token id 125 is outside the vocabulary \[0, 120\)"):
        logits(model, ids, mask)
