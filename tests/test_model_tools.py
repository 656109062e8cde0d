"""A patched model meets the tools people put models through: copies, pickles, EMA, dynamic
quantization, activation checkpointing, torch.compile, torch.export, the Auto* loaders, the hub
cache and a plain Trainer."""
import copy
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from torch import nn

import moebert_kernels as mk
from test_patch import D, FF, batch, logits, tiny

FAMILIES = ["bert", "roberta", "distilbert"]
ROUTERS = ["hash", "balanced_hash", "token_gate", "sentence_gate"]


def patched(kind, router="hash", **kw):
    model = tiny(kind)
    if router == "balanced_hash":
        kw["token_counts"] = torch.randint(0, 50, (120,))
    return mk.patch(model, num_experts=4, expert_size=24, shared=12, router=router, seed=3, **kw)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def run_python(code: str, env=None, check=True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (nothing imported yet), from the tests folder."""
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       cwd=os.path.dirname(__file__), env=full_env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


# -- copies route like the original ------------------------------------------------------------
def _deepcopy(m):
    return copy.deepcopy(m)


def _pickle(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _ema(m):
    return torch.optim.swa_utils.AveragedModel(m)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("make_copy", [_deepcopy, _pickle, _ema], ids=["deepcopy", "pickle", "ema"])
def test_copy_routes_like_the_original_on_a_new_batch(kind, make_copy):
    model = patched(kind)
    a, b = batch(), batch()
    fresh = make_copy(model)  # copied before the original saw any batch
    logits(model, *a)
    seen = make_copy(model)  # copied after it saw batch a
    logits(model, *a)
    want = logits(model, *b)
    for c in (fresh, seen):
        torch.testing.assert_close(logits(c, *b), want, rtol=0, atol=0)
    logits(seen, *a)  # and the copy's batch does not leak into the original
    torch.testing.assert_close(logits(model, *b), want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("router", ["hash", "token_gate"])
def test_quantize_dynamic_copy_routes_like_the_original(kind, router):
    model = patched(kind, router)
    a, b = batch(), batch()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear})  # a copy
    logits(model, *a)
    got = logits(quantized, *b)
    torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, inplace=True)  # the same quantization in place
    torch.testing.assert_close(got, logits(model, *b), rtol=0, atol=0)


@pytest.mark.parametrize("kind", FAMILIES)
def test_layer_called_outside_the_forward_does_not_reuse_the_last_plans(kind):
    model = patched(kind)
    ids, mask = batch()
    layer = mk.moe_layers(model)[0]
    logits(model, ids, mask)
    with pytest.raises(ValueError, match="outside its model's forward"):
        layer(torch.randn(*ids.shape, D))
    model(input_ids=ids, attention_mask=mask)  # with grad: plans kept for a checkpointed backward only
    with pytest.raises(ValueError, match="outside its model's forward"):
        layer(torch.randn(*ids.shape, D))
    torch.testing.assert_close(layer(torch.randn(*ids.shape, D), input_ids=ids).shape, (*ids.shape, D))


def test_model_holds_no_routing_state_and_hooks_are_no_closures():
    model = patched("bert")
    assert not any("routing" in k for k in model.state_dict())
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)  # with grad: nothing of the call stays on the model
    held = [(n, k) for n, m in model.named_modules() for k, v in vars(m).items()
            if isinstance(v, (mk.modules.RoutingState, mk.RoutingPlan))]
    assert not held, held
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values()):
            assert hook.__closure__ is None, hook


# -- activation checkpointing ------------------------------------------------------------------
@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("router", ["hash", "sentence_gate"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches_plain_backward(kind, router, reentrant):
    model = no_dropout(patched(kind, router)).train()
    ckpt = copy.deepcopy(model)
    enable = getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})
    calls = []
    for m in mk.moe_layers(ckpt):
        m.register_forward_pre_hook(lambda *_: calls.append(1))
    ids, mask = batch()
    labels = torch.tensor([0, 1, 2])
    for m in (model, ckpt):
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert len(calls) == 2 * len(mk.moe_layers(ckpt))  # each layer ran again in backward
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)
    assert all(m.w1.grad.abs().sum() > 0 for m in mk.moe_layers(ckpt))


# -- torch.compile and torch.export of the whole model -----------------------------------------
@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("router", ROUTERS)
def test_whole_model_compiles_fullgraph_forward_and_backward(kind, router):
    torch._dynamo.reset()
    coef = {"aux_loss_coef": 0.5} if router.endswith("gate") else {}
    model = no_dropout(patched(kind, router, **coef)).train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    ids, mask = batch()
    labels = torch.tensor([0, 1, 2])
    want = model(input_ids=ids, attention_mask=mask, labels=labels)
    got = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_whole_model_compiles_with_inductor():
    torch._dynamo.reset()
    model = patched("bert", "token_gate", aux_loss_coef=0.5).eval()
    ids, mask = batch()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(logits(compiled, ids, mask), logits(model, ids, mask), rtol=1e-4, atol=1e-5)


def test_export_strict_dynamic_shapes_save_and_load_in_fresh_process(tmp_path):
    from torch.export import Dim

    cases = [(k, "hash") for k in FAMILIES] + [("roberta", "sentence_gate")]
    for kind, router in cases:
        model = patched(kind, router).eval()
        ids, mask = batch(3, 9)
        dims = {0: Dim("batch", min=1, max=32), 1: Dim("seq", min=2, max=60)}
        ep = torch.export.export(model, (), {"input_ids": ids, "attention_mask": mask},
                                 dynamic_shapes={"input_ids": dims, "attention_mask": dims}, strict=True)
        torch.export.save(ep, tmp_path / f"{kind}-{router}.pt2")
        ids2, mask2 = batch(5, 13)  # another batch size and length
        torch.save({"ids": ids2, "mask": mask2, "want": logits(model, ids2, mask2)}, tmp_path / f"{kind}-{router}.pt")
    run_python(f"""
        import torch, moebert_kernels
        for case in {[f"{k}-{r}" for k, r in cases]!r}:
            ep = torch.export.load(f"{tmp_path}/{{case}}.pt2")
            io = torch.load(f"{tmp_path}/{{case}}.pt")
            got = ep.module()(input_ids=io["ids"], attention_mask=io["mask"]).logits
            torch.testing.assert_close(got, io["want"], rtol=1e-5, atol=1e-6, msg=case)
    """)


# -- loading a saved student the ways people load models ---------------------------------------
_HEADS = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
          "distilbert": "DistilBertForSequenceClassification"}


@pytest.mark.parametrize("kind", FAMILIES)
def test_saved_student_loads_through_every_route_in_a_fresh_process(kind, tmp_path):
    model = patched(kind, "token_gate", aux_loss_coef=0.25).eval()
    student = tmp_path / "student"
    model.save_pretrained(student)
    assert json.loads((student / "config.json").read_text())["model_type"] == f"moebert_kernels_{kind}"
    torch.save(model, tmp_path / "pickled.pt")
    # the hub's cache layout: models--org--name/{refs/main, snapshots/<hash>/...}
    repo = tmp_path / "hub" / "models--someone--tiny-student"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in student.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    ids, mask = batch()
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.save({"ids": ids, "mask": mask, "logits": logits(model, ids, mask), "hidden": hidden},
               tmp_path / "io.pt")
    # Across processes only to fp32 rounding: a fresh process lays memory out differently, and the CPU GEMMs
    # then round a few elements differently in the last bit (seen: 2 of 864 at 4e-8). A wrong weight or
    # routing is O(1e-2).
    run_python(f"""
        import torch
        import moebert_kernels as mk
        from transformers import AutoModel, AutoModelForSequenceClassification
        io = torch.load({str(tmp_path / "io.pt")!r})
        def out(m):
            with torch.no_grad():
                return m.eval()(input_ids=io["ids"], attention_mask=io["mask"])
        routes = {{
            "mk.from_pretrained": mk.from_pretrained({str(student)!r}),
            "mk.from_pretrained(hub id)": mk.from_pretrained("someone/tiny-student"),
            "AutoModelForSequenceClassification": AutoModelForSequenceClassification.from_pretrained({str(student)!r}),
            "AutoModelForSequenceClassification(hub id)":
                AutoModelForSequenceClassification.from_pretrained("someone/tiny-student"),
            "torch.load": torch.load({str(tmp_path / "pickled.pt")!r}, weights_only=False),
        }}
        for name, m in routes.items():
            assert len(mk.moe_layers(m)) == 2, name
            assert m.config.moebert["aux_loss_coef"] == 0.25, name
            torch.testing.assert_close(out(m).logits, io["logits"], rtol=1e-6, atol=1e-7, msg=name)
        base = AutoModel.from_pretrained({str(student)!r})
        assert type(base).__name__ == "MoE{_HEADS[kind].split("For")[0]}Model" and len(mk.moe_layers(base)) == 2
        torch.testing.assert_close(out(base).last_hidden_state, io["hidden"], rtol=1e-6, atol=1e-7)
        # a student loaded through AutoModel saves and reloads the same
        auto = routes["AutoModelForSequenceClassification"]
        auto.save_pretrained({str(tmp_path / "again")!r})
        again = mk.from_pretrained({str(tmp_path / "again")!r})
        assert type(again).__name__ == {_HEADS[kind]!r}
        torch.testing.assert_close(out(again).logits, io["logits"], rtol=1e-6, atol=1e-7)
    """, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("task", ["ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"])
def test_auto_class_of_each_head_loads_the_student(kind, task, tmp_path):
    prefix = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}[kind]
    config = tiny(kind).config
    config.num_labels = 2  # start and end logits for question answering
    model = getattr(transformers, prefix + task)(config).eval()
    mk.patch(model, num_experts=4, expert_size=24, shared=12)
    model.save_pretrained(tmp_path)
    auto = getattr(transformers, "AutoModel" + task).from_pretrained(tmp_path).eval()
    assert type(auto).__name__ == f"MoE{prefix}{task}" and len(mk.moe_layers(auto)) == 2
    ids, mask = batch()
    with torch.no_grad():
        want, got = model(input_ids=ids, attention_mask=mask), auto(input_ids=ids, attention_mask=mask)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_student_through_automodel_without_the_import_fails_naming_moebert_kernels(tmp_path):
    patched("bert").save_pretrained(tmp_path)
    r = run_python(f"""
        from transformers import AutoModel
        AutoModel.from_pretrained({str(tmp_path)!r})
    """, check=False)
    assert r.returncode != 0 and "moebert_kernels" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("kind", FAMILIES)
def test_checkpoint_of_the_previous_config_style_still_loads(kind, tmp_path):
    model = patched(kind).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = kind  # as saved before the MoE model types: a stock type and a moebert entry
    for k in ("aux_loss_coef",):
        cfg["moebert"].pop(k)
    act = "activation" if kind == "distilbert" else "hidden_act"
    cfg[act] = cfg[act].split(" ")[0]  # nor the stock-class guard
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids, mask = batch()
    loaded = mk.from_pretrained(str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask), rtol=0, atol=0)


def test_from_pretrained_missing_local_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        mk.from_pretrained(str(tmp_path / "nope"))


# -- the gates' balancing loss in outputs.loss -------------------------------------------------
@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("router", ["token_gate", "sentence_gate"])
def test_aux_loss_coef_adds_to_the_loss_when_labels_are_passed(kind, router):
    model = no_dropout(patched(kind, router, aux_loss_coef=0.3)).train()
    plain = copy.deepcopy(model)
    plain.config.moebert = {**plain.config.moebert, "aux_loss_coef": 0.0}
    ids, mask = batch()
    labels = torch.tensor([0, 1, 2])
    ce = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    aux = mk.aux_loss(model)
    assert aux is not None and float(aux) > 0
    torch.testing.assert_close(out.loss, ce + 0.3 * aux)
    tup = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(tup[0], out.loss)
    assert model(input_ids=ids, attention_mask=mask).loss is None


def test_token_gate_balancing_loss_leaves_padding_out():
    model = patched("bert", "token_gate").eval()
    ids, mask = batch()
    mask[0, 4:] = 0
    gate = mk.moe_layers(model)[0].router
    hidden = []
    handle = gate.register_forward_hook(lambda mod, args, out: hidden.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    keep = mask.reshape(-1).bool()
    probs = torch.nn.functional.linear(hidden[0][keep], gate.proj.weight, gate.proj.bias).softmax(-1)
    f = torch.bincount(probs.argmax(-1), minlength=4).float() / keep.sum()
    want = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(mk.aux_loss(mk.moe_layers(model)[0]), want)


def _train_biased_gates(coef, tmp_path, dense):
    model = copy.deepcopy(dense)
    torch.manual_seed(0)  # the same gate init in both arms
    mk.patch(model, num_experts=4, expert_size=24, shared=12, router="token_gate", seed=3,
             **({"aux_loss_coef": coef} if coef else {}))
    with torch.no_grad():
        for m in mk.moe_layers(model):  # every token starts on expert 0
            m.router.proj.weight.mul_(0.1)
            m.router.proj.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    gen = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, 120, (9,), generator=gen), "attention_mask": torch.ones(9, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(64)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / f"run{coef}"), max_steps=10,
                                          per_device_train_batch_size=8, learning_rate=0.05, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_strategy="no", seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    model.eval()
    ids, mask = batch()
    logits(model, ids, mask)
    return float(mk.aux_loss(model))


def test_plain_trainer_trains_the_gates_balance(tmp_path):
    before = 2 * 4 * 0.95  # two layers, nearly all tokens and probability on one of 4 experts
    # One fixed random model for both arms (tiny() draws a fresh seed): from some random starts 10 steps of
    # full-model training at this rate do not move the gates (8 draws: balanced/unbalanced 0.42-1.03). Paired,
    # a Trainer that dropped the aux loss gives balanced == unbalanced exactly; seed 0 gives 3.32 vs 6.24.
    template = tiny("bert")
    torch.manual_seed(0)
    dense = type(template)(template.config)
    balanced = _train_biased_gates(1.0, tmp_path, dense)
    unbalanced = _train_biased_gates(0.0, tmp_path, dense)
    assert balanced < 0.75 * unbalanced and balanced < 0.75 * before, (balanced, unbalanced)


# -- default sizes -----------------------------------------------------------------------------
def test_default_sizes_fit_any_ffn_and_match_the_cli():
    assert mk.default_expert_sizes(3072) == (768, 512)  # BERT-base: the paper's sizes
    assert mk.default_expert_sizes(1536) == (384, 256)  # MiniLM
    assert mk.default_expert_sizes(1024) == (256, 168)  # bert-mini: 170 rounded down to a multiple of 8
    assert mk.default_expert_sizes(1536, 300) == (300, 200)
    for kind in FAMILIES:
        model = mk.patch(tiny(kind))
        moe = mk.moe_layers(model)[0]
        assert (moe.num_experts, moe.expert_size) == (4, FF // 4)
        assert model.config.moebert["shared"] == FF // 4 * 2 // 3 // 8 * 8
