"""moebert_kernels.quantize_dynamic on whole tiny students of every family and router, as users call it.

Each int8 MoE layer is checked inside the running model against the fp64 reference that rounds activations as
the kernel does (``moe_ffn_int8_reference``), on the hidden states and plan the layer really got; the whole
model against the float student within int8 tolerance."""
import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

import moebert_kernels as mk
from moebert_kernels.modules.quantized import QuantizedMoEFeedForward
from moebert_kernels.ops.moe_ffn_int8 import dequantize_weight, moe_ffn_int8_reference
from test_families import FAMILIES, batch, out_of, tiny

ROUTERS = ["hash", "token_gate", "sentence_gate"]
# fp32 accumulation order, and a rounding tie the kernel resolves the other way (fbgemm multiplies by 1/scale)
# moving one activation by one step; a 1% scale error reads ~1e-2, a misrouted token O(1)
TIGHT = 1e-4
MODEL_INT8 = 0.1  # whole model, int8 attention and experts, logits of a random tiny model: measured < 3%


def rel(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def student(family, router="hash", tie_shared=True, head="ForSequenceClassification"):
    model = tiny(family, head)
    return mk.patch(model, num_experts=4, expert_size=16, shared=8, router=router, tie_shared=tie_shared)


def layer_reference(layer: QuantizedMoEFeedForward, hidden, residual):
    """What the int8 layer must return for ``hidden`` (fp64, kernel's activation rounding)."""
    plan, gate, _ = layer.route(hidden)
    x = hidden.reshape(-1, layer.hidden_size).double()
    b = {k: getattr(layer, k) for k in ("b1", "b2", "shared_b1")}
    shared = (layer.shared_w1_q, layer.shared_w1_scale, b["shared_b1"], layer.shared_w2_q,
              layer.shared_w2_scale) if layer.shared_size else (None,) * 5
    y = moe_ffn_int8_reference(x, plan, layer.w1_q, layer.w1_scale, b["b1"], layer.w2_q, layer.w2_scale, b["b2"],
                               gate, layer.activation, *shared, quantize_activations=True).float()
    y = y.reshape(hidden.shape)
    if layer.fuse_norm:
        y = layer.expert_layer_norm(y, plan, residual if residual is not None else hidden)
    return y


def check_layers_inside(model, ids, mask):
    """Run ``model`` with a hook on every int8 MoE layer comparing its output to ``layer_reference``."""
    errors = []

    def hook(layer, args, kwargs, out):
        residual = args[1] if len(args) > 1 else kwargs.get("input_tensor")
        errors.append(rel(out, layer_reference(layer, args[0], residual)))

    layers = [m for m in model.modules() if isinstance(m, QuantizedMoEFeedForward)]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in layers]
    try:
        with torch.no_grad():
            out = out_of(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    assert len(errors) == len(layers) > 0
    assert max(errors) < TIGHT, errors
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("router", ROUTERS)
def test_every_family_and_router(family, router):
    torch.manual_seed(0)
    model = student(family, router, tie_shared=router != "token_gate")  # both layouts over the table
    ids, mask = batch()
    q = mk.quantize_dynamic(model)
    assert q is not model and all(type(m) is mk.MoEFeedForward for m in mk.moe_layers(model))  # original intact
    layers = mk.moe_layers(q)
    assert layers and all(isinstance(m, QuantizedMoEFeedForward) for m in layers)
    assert not any(isinstance(m, nn.Linear) and type(m) is nn.Linear and "router" not in n
                   for n, m in q.named_modules()), "an nn.Linear was left float"
    for f, m in zip(mk.moe_layers(model), layers):  # int8 weights within half a step of the float ones
        for name in ("w1", "w2", "shared_w1", "shared_w2"):
            w = getattr(f, name)
            if w is not None:
                scale = getattr(m, f"{name}_scale").unsqueeze(-1)
                err = (dequantize_weight(getattr(m, f"{name}_q"), getattr(m, f"{name}_scale")) - w).abs()
                assert bool((err <= scale * 0.5001).all()), name
    for m in layers:  # the gate stays float, so the int8 student routes as its own hidden states say
        assert m.router is None or not hasattr(m.router, "proj") or type(m.router.proj) is nn.Linear
    for m in q.modules():
        if isinstance(m, mk.modules.DeferredExpertLayerNorm):
            assert isinstance(m._moe, QuantizedMoEFeedForward) and any(m._moe is x for x in layers)
    got = check_layers_inside(q, ids, mask)
    with torch.no_grad():
        want = out_of(model, ids, mask)
    assert rel(got, want) < MODEL_INT8, rel(got, want)


def test_save_load_state_dict_and_stale_packs():
    model = student("bert")
    ids, mask = batch()
    q = mk.quantize_dynamic(model)
    with torch.no_grad():
        want = out_of(q, ids, mask)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = mk.quantize_dynamic(student("bert"))  # other random weights, packed by a first forward
    with torch.no_grad():
        assert rel(out_of(fresh, ids, mask), want) > 1e-2
        fresh.load_state_dict(torch.load(buf))  # weights_only: plain int8/fp32 tensors and torch.ao's params
        assert torch.equal(out_of(fresh, ids, mask), want)
    sd = q.state_dict()
    assert sd["bert.encoder.layer.0.output.w1_q"].dtype == torch.int8
    assert not any(k.endswith((".w1", ".w2", ".shared_w1")) for k in sd)


def test_deepcopy_pickle_and_to():
    model = student("distilbert")
    ids, mask = batch()
    q = mk.quantize_dynamic(model)
    with torch.no_grad():
        want = out_of(q, ids, mask)
        for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
            assert torch.equal(out_of(clone, ids, mask), want)
        assert torch.equal(out_of(q.to(torch.device("cpu")), ids, mask), want)


def test_threads_share_one_layer():
    """The packed-weight cache is built lazily: threads racing to build it must all get right answers.
    (Concurrent calls of a whole patched model share its per-batch routing state: that is the routing
    module's business; here each thread passes its own plan.)"""
    layer = mk.quantize_dynamic(student("bert")).bert.encoder.layer[0].output
    x = torch.randn(4, 33, layer.hidden_size)
    plans = [mk.RoutingPlan.from_expert_ids(torch.randint(0, 4, (33,)), 4) for _ in x]
    with torch.no_grad():
        want = [layer(x[i], plan=plans[i]) for i in range(4)]
    layer._packed = None
    results, errors = [None] * 4, []

    def worker(i):
        try:
            with torch.no_grad():
                results[i] = layer(x[i], plan=plans[i])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(r, w) for r, w in zip(results, want))


def test_torch_compile():
    model = student("bert", router="token_gate")
    ids, mask = batch()
    q = mk.quantize_dynamic(model)
    with torch.no_grad():
        want = out_of(q, ids, mask)
        got = out_of(torch.compile(q), ids, mask)
    assert rel(got, want) < 1e-5


def test_plain_torch_ao_leaves_experts_float():
    model = student("bert")
    ids, mask = batch()
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert all(type(m) is mk.MoEFeedForward and m.w1.dtype == torch.float32 for m in mk.moe_layers(q))
    with torch.no_grad():
        assert rel(out_of(q, ids, mask), out_of(model, ids, mask)) < MODEL_INT8


def test_inplace_dense_and_twice():
    model = tiny("roberta")
    ids, mask = batch()
    with torch.no_grad():
        want = out_of(model, ids, mask)
    q = mk.quantize_dynamic(model, inplace=True)
    assert q is model and not any(type(m) is nn.Linear for m in q.modules())
    again = mk.quantize_dynamic(student("bert"))
    again2 = mk.quantize_dynamic(again)  # already int8: nothing left to do, still runs
    with torch.no_grad():
        assert rel(out_of(q, ids, mask), want) < MODEL_INT8
        assert torch.equal(out_of(again2, ids, mask), out_of(again, ids, mask))


def test_bad_input_is_named():
    model = student("bert")
    with pytest.raises(TypeError, match="float32 model on the CPU"):
        mk.quantize_dynamic(copy.deepcopy(model).bfloat16())
    with pytest.raises(ValueError, match="qint8 only"):
        mk.quantize_dynamic(model, dtype=torch.float16)
    with pytest.raises(TypeError, match="nn.Module"):
        mk.quantize_dynamic("bert")
    layer = mk.quantize_dynamic(model).bert.encoder.layer[0].output
    with pytest.raises(ValueError, match="already quantized"):
        QuantizedMoEFeedForward.from_float(layer)

