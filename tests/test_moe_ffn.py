"""The reference moe_ffn (torch backend) against an independent per-token loop."""
import pytest
import torch
import torch.nn.functional as F

from moebert_kernels import RoutingPlan, moe_ffn
from moebert_kernels.ops import moe_ffn_reference
from _oplog import OpLog


def per_token_loop(x, ids, w1, b1, w2, b2, gate=None, activation="gelu"):
    act = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu}[activation]
    rows = []
    for t in range(x.shape[0]):
        e = int(ids[t])
        y = w2[e] @ act(w1[e] @ x[t] + b1[e]) + b2[e]
        rows.append(y * gate[t] if gate is not None else y)
    return torch.stack(rows) if rows else x.new_zeros(0, w2.shape[1])


def make(T, d, h, E, dtype=torch.float64, ids=None, gate=False, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    w1 = torch.randn(E, h, d, generator=g, dtype=dtype) / d**0.5
    b1 = torch.randn(E, h, generator=g, dtype=dtype)
    w2 = torch.randn(E, d, h, generator=g, dtype=dtype) / h**0.5
    b2 = torch.randn(E, d, generator=g, dtype=dtype)
    ids = torch.randint(0, E, (T,), generator=g) if ids is None else ids
    gt = torch.rand(T, generator=g, dtype=dtype) + 0.1 if gate else None
    return x, ids, w1, b1, w2, b2, gt


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


CASES = {
    "random_E4": dict(T=37, E=4),
    "E1": dict(T=13, E=1),
    "E8": dict(T=50, E=8),
    "T1": dict(T=1, E=4),
    "empty_expert": dict(T=20, E=4, ids=lambda T: torch.tensor([0, 1, 3] * 6 + [0, 1])),
    "all_on_one": dict(T=16, E=4, ids=lambda T: torch.full((T,), 2)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("gate", [False, True])
def test_reference_matches_loop(case, dtype, tol, gate):
    c = CASES[case]
    T, E = c["T"], c["E"]
    ids = c["ids"](T) if "ids" in c else None
    x, ids, w1, b1, w2, b2, g = make(T, 24, 40, E, dtype=dtype, ids=ids, gate=gate)
    plan = RoutingPlan.from_expert_ids(ids, E)
    out = moe_ffn(x, plan, w1, b1, w2, b2, g)
    ref = per_token_loop(*(t.double() if t is not None and t.is_floating_point() else t
                           for t in (x, ids, w1, b1, w2, b2, g)))
    assert out.dtype == dtype and out.shape == (T, 24)
    assert rel(out, ref) < tol


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_other_activations(activation):
    x, ids, w1, b1, w2, b2, _ = make(19, 16, 32, 4)
    out = moe_ffn(x, RoutingPlan.from_expert_ids(ids, 4), w1, b1, w2, b2, activation=activation)
    assert rel(out, per_token_loop(x, ids, w1, b1, w2, b2, activation=activation)) < 1e-12


def test_exact_gelu_is_used():
    # erf GELU and tanh GELU differ by ~1e-4 here; the default must be erf (BERT).
    x, ids, w1, b1, w2, b2, _ = make(30, 16, 32, 2)
    plan = RoutingPlan.from_expert_ids(ids, 2)
    erf = per_token_loop(x, ids, w1, b1, w2, b2, activation="gelu")
    tanh = per_token_loop(x, ids, w1, b1, w2, b2, activation="gelu_tanh")
    out = moe_ffn(x, plan, w1, b1, w2, b2)
    assert rel(out, erf) < 1e-12 < rel(out, tanh)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("ids", [None, "empty"])
def test_gradcheck(gate, ids):
    T, E = 7, 3
    fixed = torch.tensor([0, 2, 0, 2, 2, 0, 0]) if ids == "empty" else None
    x, ids, w1, b1, w2, b2, g = make(T, 5, 6, E, ids=fixed, gate=gate)
    plan = RoutingPlan.from_expert_ids(ids, E)
    inputs = [t.requires_grad_() for t in (x, w1, b1, w2, b2)] + ([g.requires_grad_()] if gate else [])

    def f(x, w1, b1, w2, b2, *g):
        return moe_ffn(x, plan, w1, b1, w2, b2, g[0] if g else None)

    assert torch.autograd.gradcheck(f, inputs)


def test_grads_match_loop_fp32():
    x, ids, w1, b1, w2, b2, g = make(29, 12, 20, 4, dtype=torch.float32, gate=True)
    leaves = [t.requires_grad_() for t in (x, w1, b1, w2, b2, g)]
    dy = torch.randn(29, 12)
    out = moe_ffn(x, RoutingPlan.from_expert_ids(ids, 4), w1, b1, w2, b2, g)
    grads = torch.autograd.grad(out, leaves, dy)
    dl = [t.detach().double().requires_grad_() for t in leaves]
    ref = per_token_loop(dl[0], ids, *dl[1:5], dl[5])
    ref_grads = torch.autograd.grad(ref, dl, dy.double())
    for name, a, b in zip(("x", "w1", "b1", "w2", "b2", "gate"), grads, ref_grads):
        assert rel(a, b) < 1e-5, name


def test_opcheck():
    from torch.library import opcheck

    x, ids, w1, b1, w2, b2, g = make(11, 8, 12, 3, dtype=torch.float32, gate=True)
    plan = RoutingPlan.from_expert_ids(ids, 3)
    for gate in (None, g):
        args = [t.clone().requires_grad_() for t in (x,)] + [plan.sorted_token_ids, plan.expert_offsets] + \
            [t.clone().requires_grad_() for t in (w1, b1, w2, b2)] + \
            [None if gate is None else gate.clone().requires_grad_(), "gelu", "torch", True]
        opcheck(torch.ops.moebert.moe_ffn_fwd.default, tuple(args))
        grad_out = torch.randn(11, 8)
        bwd = (grad_out, x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, gate, x.new_empty(0),
               "gelu", "torch", [True] * 6)
        opcheck(torch.ops.moebert.moe_ffn_bwd.default, bwd)


def test_no_grad_saves_nothing_and_matches():
    x, ids, w1, b1, w2, b2, _ = make(10, 8, 8, 2, dtype=torch.float32)
    plan = RoutingPlan.from_expert_ids(ids, 2)
    with torch.no_grad():
        a = moe_ffn(x, plan, w1, b1, w2, b2)
    assert not a.requires_grad
    assert torch.equal(a, moe_ffn(x, plan, w1, b1, w2, b2))


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_does_not_zero_fill_the_saved_hidden_grad(threads, monkeypatch):
    """The pre-activation is an op output only to be saved; autograd must not make a zero [T, h] grad for it."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # both torch-backend paths
    T, d, h, E = 11, 6, 10, 3
    x, ids, w1, b1, w2, b2, gate = make(T, d, h, E, dtype=torch.float32, gate=True)
    params = [t.requires_grad_() for t in (x, w1, b1, w2, b2, gate)]
    out = moe_ffn(x, RoutingPlan.from_expert_ids(ids, E), w1, b1, w2, b2, gate)
    log = OpLog()
    with log:
        out.square().sum().backward()
    assert not [op for op in log.ops if op[0] in ("zeros.default", "zeros_like.default") and op[1] == (T, h)], log.ops
    assert all(p.grad is not None for p in params)


BAD = [
    (lambda a: a.update(x=a["x"][None]), ValueError, "x must be"),
    (lambda a: a.update(w1=a["w1"][:, :, :-1]), ValueError, "w1"),
    (lambda a: a.update(w2=a["w2"][:, :, :-1]), ValueError, "w2"),
    (lambda a: a.update(b1=a["b1"][:, :-1]), ValueError, "b1"),
    (lambda a: a.update(b2=a["b2"][:-1]), ValueError, "b2"),
    (lambda a: a.update(w1=a["w1"].double()), TypeError, "dtype"),
    (lambda a: a.update(x=a["x"].long()), TypeError, "floating"),
    (lambda a: a.update(gate=torch.rand(3)), ValueError, "gate"),
    (lambda a: a.update(plan=RoutingPlan.from_expert_ids(torch.zeros(9, dtype=torch.long), 4)), ValueError, "tokens"),
    (lambda a: a.update(plan=RoutingPlan.from_expert_ids(torch.zeros(10, dtype=torch.long), 2)), ValueError,
     "experts"),
    (lambda a: a.update(plan="not a plan"), TypeError, "RoutingPlan"),
    (lambda a: a.update(activation="swish"), ValueError, "activation"),
    (lambda a: a.update(backend="nope"), ValueError, "backend"),
]


@pytest.mark.parametrize("mutate,exc,msg", BAD)
def test_bad_input(mutate, exc, msg):
    x, ids, w1, b1, w2, b2, _ = make(10, 8, 6, 4, dtype=torch.float32)
    args = dict(x=x, plan=RoutingPlan.from_expert_ids(ids, 4), w1=w1, b1=b1, w2=w2, b2=b2)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    mutate(args)
    with pytest.raises(exc, match=msg):
        moe_ffn(**args)
    for k, v in snapshot.items():  # bad input never changes state
        assert torch.equal(v, {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2}[k])


def test_reference_function_is_the_oracle_of_the_backend():
    x, ids, w1, b1, w2, b2, _ = make(10, 8, 6, 4)
    plan = RoutingPlan.from_expert_ids(ids, 4)
    a = moe_ffn_reference(x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2)
    assert rel(moe_ffn(x, plan, w1, b1, w2, b2, backend="torch"), a) < 1e-13


@pytest.fixture(params=[1, 2], ids=["1thread-loop", "2threads-padded"])
def threads(request):
    # The torch backend pads experts into one bmm on CPU with >1 thread and loops otherwise.
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("case", ["random_E4", "empty_expert", "all_on_one", "T1"])
def test_torch_backend_paths_forward_and_grads(threads, case):
    from moebert_kernels.ops import moe_ffn as _  # noqa: F401
    import sys

    backend = sys.modules["moebert_kernels.ops.moe_ffn"]
    c = CASES[case]
    T, E = c["T"], c["E"]
    x, ids, w1, b1, w2, b2, g = make(T, 12, 20, E, ids=c["ids"](T) if "ids" in c else None, gate=True)
    plan = RoutingPlan.from_expert_ids(ids, E)
    args = (x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, g, "gelu")
    out, hidden = backend.moe_ffn_forward(*args, True)
    want = per_token_loop(x, ids, w1, b1, w2, b2, g)
    assert rel(out, want) < 1e-12
    hs = torch.stack([w1[int(ids[t])] @ x[t] + b1[int(ids[t])] for t in plan.sorted_token_ids.tolist()])
    assert rel(hidden, hs) < 1e-12  # saved pre-activation, expert order
    dy = torch.randn_like(out)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, g)]
    ref = torch.autograd.grad(per_token_loop(leaves[0], ids, *leaves[1:5], leaves[5]), leaves, dy)
    for saved in (hidden, x.new_empty(0)):  # with the saved hidden and recomputing it
        grads = backend.moe_ffn_backward(dy, *args[:8], saved, "gelu", [True] * 6)
        for name, a, b in zip(("x", "w1", "b1", "w2", "b2", "gate"), grads, ref):
            assert rel(a, b) < 1e-12, name


def test_device_mismatch_is_named():
    x, ids, w1, b1, w2, b2, _ = make(6, 8, 6, 2, dtype=torch.float32)
    plan = RoutingPlan.from_expert_ids(ids, 2)
    with pytest.raises(ValueError, match="w2 is on meta"):
        moe_ffn(x, plan, w1, b1, w2.to("meta"), b2)


# ---- gated experts (ModernBERT's GeGLU: act(a) * g) and absent biases ---------------------------

def gated_per_token_loop(x, ids, w1, b1, w2, b2, gate=None, activation="geglu"):
    """An independent oracle: y_t = W2 (act(a) * g) + b2 with [a; g] = W1 x_t + b1 split in halves."""
    act = {"geglu": F.gelu, "geglu_tanh": lambda h: F.gelu(h, approximate="tanh"), "reglu": F.relu}[activation]
    h = w2.shape[2]
    rows = []
    for t in range(x.shape[0]):
        e = int(ids[t])
        up = w1[e] @ x[t] + (b1[e] if b1 is not None else 0)
        y = w2[e] @ (act(up[:h]) * up[h:]) + (b2[e] if b2 is not None else 0)
        rows.append(y * gate[t] if gate is not None else y)
    return torch.stack(rows) if rows else x.new_zeros(0, w2.shape[1])


def make_gated(T, d, h, E, dtype=torch.float64, ids=None, gate=False, bias=True):
    x, ids, w1, b1, w2, b2, g = make(T, d, 2 * h, E, dtype=dtype, ids=ids, gate=gate)
    w2 = w2[:, :, :h] * 2**0.5
    return (x, ids, w1, b1 if bias else None, w2.contiguous(), b2 if bias else None, g)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gated_matches_loop(case, bias, dtype, tol, threads):
    c = CASES[case]
    T, E = c["T"], c["E"]
    x, ids, w1, b1, w2, b2, g = make_gated(T, 24, 20, E, dtype, c["ids"](T) if "ids" in c else None, True, bias)
    plan = RoutingPlan.from_expert_ids(ids, E)
    out = moe_ffn(x, plan, w1, b1, w2, b2, g, activation="geglu")
    d64 = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = gated_per_token_loop(d64(x), ids, d64(w1), d64(b1), d64(w2), d64(b2), d64(g))
    assert out.dtype == dtype and rel(out, ref) < tol
    assert rel(moe_ffn_reference(x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, g, "geglu"),
               ref) < tol


@pytest.mark.parametrize("activation", ["geglu_tanh", "reglu"])
def test_gated_other_activations(activation):
    x, ids, w1, b1, w2, b2, _ = make_gated(19, 16, 12, 4)
    out = moe_ffn(x, RoutingPlan.from_expert_ids(ids, 4), w1, b1, w2, b2, activation=activation)
    assert rel(out, gated_per_token_loop(x, ids, w1, b1, w2, b2, activation=activation)) < 1e-12


def test_geglu_is_exact_erf_gelu_times_g():
    x, ids, w1, b1, w2, b2, _ = make_gated(30, 16, 12, 2)
    w1 = w1 * 4  # large pre-activations: erf and tanh GELU differ visibly
    plan = RoutingPlan.from_expert_ids(ids, 2)
    out = moe_ffn(x, plan, w1, b1, w2, b2, activation="geglu")
    erf = gated_per_token_loop(x, ids, w1, b1, w2, b2, activation="geglu")
    tanh = gated_per_token_loop(x, ids, w1, b1, w2, b2, activation="geglu_tanh")
    assert rel(out, erf) < 1e-12 < rel(out, tanh)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("gate", [False, True])
def test_gated_gradcheck(threads, bias, gate):
    fixed = torch.tensor([0, 2, 0, 2, 2, 0, 0])  # expert 1 empty
    x, ids, w1, b1, w2, b2, g = make_gated(7, 5, 4, 3, ids=fixed, gate=gate, bias=bias)
    plan = RoutingPlan.from_expert_ids(ids, 3)
    present = [t for t in (x, w1, b1, w2, b2, g) if t is not None]
    for t in present:
        t.requires_grad_()

    def f(*leaves):
        it = iter(leaves)
        args = [next(it) if t is not None else None for t in (x, w1, b1, w2, b2, g)]
        return moe_ffn(args[0], plan, *args[1:5], args[5], activation="geglu")

    assert torch.autograd.gradcheck(f, present)


def test_gated_opcheck_no_bias():
    from torch.library import opcheck

    x, ids, w1, _, w2, _, g = make_gated(11, 8, 6, 3, dtype=torch.float32, gate=True, bias=False)
    plan = RoutingPlan.from_expert_ids(ids, 3)
    args = (x.clone().requires_grad_(), plan.sorted_token_ids, plan.expert_offsets, w1.clone().requires_grad_(),
            None, w2.clone().requires_grad_(), None, g.clone().requires_grad_(), "geglu", "torch", True)
    opcheck(torch.ops.moebert.moe_ffn_fwd.default, args)
    bwd = (torch.randn(11, 8), x, plan.sorted_token_ids, plan.expert_offsets, w1, None, w2, None, g, x.new_empty(0),
           "geglu", "torch", [True] * 6)
    opcheck(torch.ops.moebert.moe_ffn_bwd.default, bwd)


def test_gated_poisoned_outputs_are_overwritten(monkeypatch):
    """The torch backend allocates its outputs with new_empty; NaN-fill them and check nothing leaks."""
    import sys

    backend = sys.modules["moebert_kernels.ops.moe_ffn"]
    real = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *s, **k: real(self, *s, **k).fill_(float("nan")))
    x, ids, w1, _, w2, _, g = make_gated(20, 8, 6, 4, ids=torch.tensor([0, 1, 3] * 6 + [0, 1]), gate=True,
                                         bias=False)
    plan = RoutingPlan.from_expert_ids(ids, 4)
    out, hidden = backend.moe_ffn_forward(x, plan.sorted_token_ids, plan.expert_offsets, w1, None, w2, None, g,
                                          "geglu", True)
    assert torch.isfinite(out).all() and torch.isfinite(hidden).all() and hidden.shape == (20, 12)
    grads = backend.moe_ffn_backward(torch.randn(20, 8), x, plan.sorted_token_ids, plan.expert_offsets, w1, None,
                                     w2, None, g, hidden, "geglu", [True] * 6)
    for name, t in zip(("x", "w1", "w2", "gate"), (grads[0], grads[1], grads[3], grads[5])):
        assert torch.isfinite(t).all(), name
    assert grads[2].numel() == 0 and grads[4].numel() == 0


GATED_BAD = [
    (lambda a: a.update(w1=a["w1"][:, :-1]), "odd row count"),
    (lambda a: a.update(w2=torch.randn(4, 8, 12)), "gated"),
    (lambda a: a.update(b1=torch.randn(4, 6)), "b1"),
]


@pytest.mark.parametrize("mutate,msg", GATED_BAD)
def test_gated_bad_shapes_are_named(mutate, msg):
    x, ids, w1, b1, w2, b2, _ = make_gated(10, 8, 6, 4, dtype=torch.float32)
    args = dict(x=x, plan=RoutingPlan.from_expert_ids(ids, 4), w1=w1, b1=b1, w2=w2, b2=b2, activation="geglu")
    mutate(args)
    with pytest.raises(ValueError, match=msg):
        moe_ffn(**args)


def test_every_backend_declares_gated_and_biasless_calls():
    from moebert_kernels.ops import BackendUnavailableError, select_backend
    from moebert_kernels.ops.dispatch import backend_status
    from moebert_kernels.ops.moe_ffn import needed_features

    assert needed_features(None, None, "geglu") == ("gated", "no_bias")
    assert needed_features(torch.zeros(1), torch.zeros(1), "gelu") == ()
    for backend in ("torch", "triton", "cuda"):
        why = backend_status("moe_ffn", backend, torch.device("cuda"), ("gated", "no_bias"))[1]
        assert "does not implement" not in why, (backend, why)
    # A forced cuda call fails for the device only, never for a feature.
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors") as info:
        select_backend("moe_ffn", "cpu", "cuda", needs=("gated", "no_bias"))
    assert "does not implement" not in str(info.value)
    assert select_backend("moe_ffn", "cpu", needs=("gated", "no_bias")) == "torch"
