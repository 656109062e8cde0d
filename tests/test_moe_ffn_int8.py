"""moe_ffn_int8 (fbgemm, int8 weights, dynamic activations) against its fp64 references.

Two oracles: the reference that rounds activations as the kernel does (fp64 otherwise) must match to float
rounding (1e-5), so a wrong scale or a misrouted token fails far below int8 noise; the float-activation
reference and the fp32 weights must match to int8 tolerance (7-bit activations, 8-bit weights: a few %)."""
import pytest
import torch

from moebert_kernels import RoutingPlan
from moebert_kernels.ops import moe_ffn_reference
from moebert_kernels.ops.moe_ffn_int8 import (dequantize_weight, moe_ffn_int8, moe_ffn_int8_reference, pack_experts,
                                              quantize_weight)

ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "geglu", "reglu"]
TIGHT = 1e-5  # emulated rounding: only fp32 accumulation order and rare rounding ties differ
INT8 = 0.06  # 7-bit activations over two GEMMs on random data: measured 1-2%


def rel(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def make(T, d, h, s, E, activation="gelu", bias=True, gate=False, ids=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 2 if activation in ("geglu", "reglu") else 1
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    w = dict(w1=r(E, k * h, d, scale=d ** -0.5), b1=r(E, k * h) if bias else None,
             w2=r(E, d, h, scale=(h + s) ** -0.5), b2=r(E, d) if bias else None,
             shared_w1=r(k * s, d, scale=d ** -0.5) if s else None,
             shared_b1=r(k * s) if s and bias else None, shared_w2=r(d, s, scale=(h + s) ** -0.5) if s else None)
    ids = torch.randint(0, E, (T,), generator=g) if ids is None else ids
    gt = torch.rand(T, generator=g) + 0.1 if gate else None
    return r(T, d), w, RoutingPlan.from_expert_ids(ids, E), gt


def quantized(w):
    return {k: (None if v is None or k.startswith(("b", "shared_b")) else quantize_weight(v)) for k, v in w.items()}


def run_kernel(x, w, q, plan, gate, activation):
    up, down = pack_experts(*q["w1"], w["b1"]), pack_experts(*q["w2"], w["b2"])
    su = sd = None
    if q["shared_w1"] is not None:
        b = None if w["shared_b1"] is None else w["shared_b1"][None]
        su = pack_experts(q["shared_w1"][0][None], q["shared_w1"][1][None], b)[0]
        sd = pack_experts(q["shared_w2"][0][None], q["shared_w2"][1][None], None)[0]
    return moe_ffn_int8(x, plan, up, down, gate, activation, su, sd)


def reference(x, w, q, plan, gate, activation, quantize_activations):
    s1, s2 = q["shared_w1"] or (None, None), q["shared_w2"] or (None, None)
    return moe_ffn_int8_reference(x.double(), plan, *q["w1"], w["b1"], *q["w2"], w["b2"], gate, activation,
                                  *s1, w["shared_b1"], *s2, quantize_activations=quantize_activations)


CASES = {  # (T, d, h, s, E, ids)
    "odd": (37, 24, 20, 12, 3, None),
    "no_shared": (29, 16, 24, 0, 4, None),
    "one_token": (1, 16, 8, 8, 4, None),
    "empty_expert": (12, 16, 8, 4, 5, torch.tensor([0, 2, 2, 0, 4, 4, 0, 2, 0, 0, 4, 2])),
    "all_on_one": (17, 16, 8, 8, 4, torch.full((17,), 3)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias,gate", [(True, False), (False, True)])
def test_kernel_matches_references(case, activation, bias, gate):
    T, d, h, s, E, ids = CASES[case]
    x, w, plan, gt = make(T, d, h, s, E, activation, bias, gate, ids)
    q = quantized(w)
    y = run_kernel(x, w, q, plan, gt, activation)
    assert y.shape == (T, d) and y.dtype == torch.float32
    assert rel(y, reference(x, w, q, plan, gt, activation, True)) < TIGHT
    assert rel(y, reference(x, w, q, plan, gt, activation, False)) < INT8
    float_model = moe_ffn_reference(x.double(), plan.sorted_token_ids, plan.expert_offsets,
                                    *(None if w[k] is None else w[k].double()
                                      for k in ("w1", "b1", "w2", "b2")), None if gt is None else gt.double(),
                                    activation, *(None if w[k] is None else w[k].double()
                                                  for k in ("shared_w1", "shared_b1", "shared_w2")))
    assert rel(y, float_model) < INT8


def test_no_tokens():
    x, w, plan, _ = make(0, 16, 8, 8, 3)
    y = run_kernel(x, w, quantized(w), plan, None, "gelu")
    assert y.shape == (0, 16)


def test_a_wrong_scale_fails_the_tight_check():
    x, w, plan, _ = make(40, 16, 8, 8, 3, ids=torch.arange(40) % 3)
    q = quantized(w)
    want = reference(x, w, q, plan, None, "gelu", True)
    w_q, scale = q["w2"]
    bad = dict(q, w2=(w_q, scale * torch.tensor([1.0, 1.01, 1.0])[:, None]))  # expert 1's fc2 off by 1%
    assert rel(run_kernel(x, w, bad, plan, None, "gelu"), want) > 10 * TIGHT
    assert rel(run_kernel(x, w, q, plan, None, "gelu"), want) < TIGHT


def test_a_misrouted_token_fails_the_tight_check():
    x, w, plan, _ = make(40, 16, 8, 8, 3, ids=torch.arange(40) % 3)
    q = quantized(w)
    ids = plan.expert_ids.clone()
    ids[7] = (ids[7] + 1) % 3
    y = run_kernel(x, w, q, RoutingPlan.from_expert_ids(ids, 3), None, "gelu")
    assert rel(y, reference(x, w, q, plan, None, "gelu", True)) > 10 * TIGHT


def test_quantize_weight_per_output_channel():
    w = torch.randn(3, 5, 7)
    w[1, 2] = 0.0
    w[2, 0] *= 1000  # one large row must not coarsen the others: the scales are per row
    w_q, scale = quantize_weight(w)
    assert w_q.dtype == torch.int8 and scale.shape == (3, 5) and int(w_q.abs().max()) == 127
    err = (dequantize_weight(w_q, scale) - w).abs()
    assert bool((err <= scale.unsqueeze(-1) / 2 + 1e-6 * w.abs()).all())
    assert bool((w_q[1, 2] == 0).all()) and float(scale[1, 2]) == 1.0
    assert torch.equal(quantize_weight(-w)[0], -w_q)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_weight(torch.ones(2, 2, dtype=torch.int8))
    x, w, plan, _ = make(8, 16, 8, 0, 2)
    q = quantized(w)
    with pytest.raises(TypeError, match="fp32 CPU activations"):
        run_kernel(x.bfloat16(), w, q, plan, None, "gelu")
    with pytest.raises(ValueError, match="routes to 3 experts"):
        run_kernel(x, w, q, RoutingPlan.from_expert_ids(torch.zeros(8, dtype=torch.long), 3), None, "gelu")
