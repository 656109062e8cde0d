"""moe_ffn with a tied shared expert: the reference and the torch backend against a per-token loop."""
import pytest
import torch
import torch.nn.functional as F

from moebert_kernels import RoutingPlan, moe_ffn
from moebert_kernels.ops import BackendUnavailableError, moe_ffn_reference
from _oplog import OpLog

NAMES = ("x", "w1", "b1", "w2", "b2", "gate", "shared_w1", "shared_b1", "shared_w2")
from moebert_kernels.ops.moe_ffn import GATED_ACTIVATIONS as GATED

ACT = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu}


def per_token_loop(x, ids, w1, b1, w2, b2, gate, w1s, b1s, w2s, activation="gelu"):
    gated = activation in GATED

    def act(pre):  # gated: act(a) * g of the two halves
        if not gated:
            return ACT[activation](pre)
        a, g = pre.chunk(2)
        return ACT[GATED[activation]](a) * g

    def up(w, b, v):
        return w @ v + (0 if b is None else b)

    rows = []
    for t in range(x.shape[0]):
        e = int(ids[t])
        y = w2s @ act(up(w1s, b1s, x[t])) + w2[e] @ act(up(w1[e], None if b1 is None else b1[e], x[t]))
        y = y + (0 if b2 is None else b2[e])
        rows.append(y * gate[t] if gate is not None else y)
    return torch.stack(rows) if rows else x.new_zeros(0, w2.shape[1])


def make(T, d, h, s, E, dtype=torch.float64, ids=None, gate=False, seed=None, gated=False, bias=True):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=dtype) * scale  # noqa: E731
    x = r(T, d)
    k = 2 if gated else 1  # gated: the up projection holds a rows, then g rows
    w1, b1, w2, b2 = r(E, k * h, d, scale=d ** -0.5), r(E, k * h), r(E, d, h, scale=(h + s) ** -0.5), r(E, d)
    w1s, b1s, w2s = r(k * s, d, scale=d ** -0.5), r(k * s), r(d, s, scale=(h + s) ** -0.5)
    if not bias:
        b1 = b2 = b1s = None
    ids = torch.randint(0, E, (T,), generator=g) if ids is None else ids
    gt = torch.rand(T, generator=g, dtype=dtype) + 0.1 if gate else None
    return [x, w1, b1, w2, b2, gt, w1s, b1s, w2s], ids


def call(inputs, plan, **kw):
    x, w1, b1, w2, b2, g, w1s, b1s, w2s = inputs
    return moe_ffn(x, plan, w1, b1, w2, b2, g, shared_w1=w1s, shared_b1=b1s, shared_w2=w2s, **kw)


def loop(inputs, ids, activation="gelu"):
    x, w1, b1, w2, b2, g, w1s, b1s, w2s = inputs
    return per_token_loop(x, ids, w1, b1, w2, b2, g, w1s, b1s, w2s, activation)


# (activation, biases): the plain FFN, ModernBERT's gated bias-free one, and the other gated forms
LAYOUTS = {"gelu": ("gelu", True), "geglu_nobias": ("geglu", False), "geglu_tanh": ("geglu_tanh", True),
           "reglu_nobias": ("reglu", False), "relu_nobias": ("relu", False)}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


CASES = {
    "random_E4": dict(T=37, E=4),
    "E1": dict(T=13, E=1),
    "E8": dict(T=50, E=8),
    "T1": dict(T=1, E=4),
    "empty_expert": dict(T=20, E=4, ids=lambda T: torch.tensor([0, 1, 3] * 6 + [0, 1])),
    "all_on_one": dict(T=16, E=4, ids=lambda T: torch.full((T,), 2)),
}


@pytest.fixture(params=[1, 2], ids=["1thread-loop", "2threads-padded"])
def threads(request):
    # The torch backend pads experts into one bmm on CPU with >1 thread and loops otherwise.
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("gate", [False, True])
def test_forward_matches_loop(threads, case, dtype, tol, gate):
    c = CASES[case]
    T, E = c["T"], c["E"]
    inputs, ids = make(T, 24, 20, 12, E, dtype=dtype, ids=c["ids"](T) if "ids" in c else None, gate=gate)
    plan = RoutingPlan.from_expert_ids(ids, E)
    out = call(inputs, plan)
    want = loop([t.double() if t is not None else None for t in inputs], ids)
    assert out.dtype == dtype and out.shape == (T, 24)
    assert rel(out, want) < tol
    ref = moe_ffn_reference(inputs[0], plan.sorted_token_ids, plan.expert_offsets, *inputs[1:6], "gelu", *inputs[6:])
    assert rel(ref, want) < tol


@pytest.mark.parametrize("case", ["random_E4", "empty_expert", "all_on_one", "T1", "E1"])
@pytest.mark.parametrize("gate", [False, True])
def test_grads_match_loop(threads, case, gate):
    c = CASES[case]
    T, E = c["T"], c["E"]
    inputs, ids = make(T, 12, 10, 6, E, ids=c["ids"](T) if "ids" in c else None, gate=gate)
    leaves = [t.requires_grad_() if t is not None else None for t in inputs]
    present = [t for t in leaves if t is not None]
    dy = torch.randn(T, 12, dtype=torch.float64)
    got = torch.autograd.grad(call(leaves, RoutingPlan.from_expert_ids(ids, E)), present, dy)
    want = torch.autograd.grad(loop(leaves, ids), present, dy)
    names = [n for n, t in zip(NAMES, leaves) if t is not None]
    for name, a, b in zip(names, got, want):
        assert rel(a, b) < 1e-12, name


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", ["random_E4", "empty_expert", "all_on_one", "T1"])
@pytest.mark.parametrize("gate", [False, True])
def test_gated_and_bias_free_forward_and_grads_match_loop(threads, layout, case, gate):
    """ModernBERT's layout: the shared up projection holds 2s rows (a, then g), biases may be absent."""
    activation, bias = LAYOUTS[layout]
    c = CASES[case]
    T, E = c["T"], c["E"]
    inputs, ids = make(T, 12, 10, 6, E, ids=c["ids"](T) if "ids" in c else None, gate=gate,
                       gated=activation in GATED, bias=bias)
    leaves = [t.requires_grad_() if t is not None else None for t in inputs]
    plan = RoutingPlan.from_expert_ids(ids, E)
    out = call(leaves, plan, activation=activation)
    want = loop(leaves, ids, activation)
    assert rel(out, want) < 1e-12
    ref = moe_ffn_reference(leaves[0], plan.sorted_token_ids, plan.expert_offsets, *leaves[1:6], activation,
                            *leaves[6:])
    assert rel(ref, want) < 1e-12
    present = [t for t in leaves if t is not None]
    dy = torch.randn(T, 12, dtype=torch.float64)
    got = torch.autograd.grad(out, present, dy)
    wanted = torch.autograd.grad(want, present, dy)
    for name, a, b in zip([n for n, t in zip(NAMES, leaves) if t is not None], got, wanted):
        assert rel(a, b) < 1e-12, name


@pytest.mark.parametrize("layout", ["geglu_nobias", "geglu_tanh"])
def test_gated_gradcheck_and_opcheck(layout):
    from torch.library import opcheck

    activation, bias = LAYOUTS[layout]
    inputs, ids = make(7, 5, 4, 3, 3, ids=torch.tensor([0, 2, 0, 2, 2, 0, 0]), gate=True, gated=True, bias=bias)
    plan = RoutingPlan.from_expert_ids(ids, 3)
    mask = [t is not None for t in inputs]
    present = [t.requires_grad_() for t in inputs if t is not None]

    def f(*ts):
        it = iter(ts)
        return call([next(it) if m else None for m in mask], plan, activation=activation)

    assert torch.autograd.gradcheck(f, present)
    x, w1, b1, w2, b2, g, w1s, b1s, w2s = (None if t is None else t.detach().float() for t in inputs)
    opcheck(torch.ops.moebert.moe_ffn_fwd, (x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, g,
                                            activation, "torch", True, w1s, b1s, w2s))


def test_tied_equals_copies():
    """A shared expert equals the paper's layout that copies the shared neurons into every expert."""
    inputs, ids = make(41, 16, 10, 6, 4, gate=True, seed=1)
    x, w1, b1, w2, b2, g, w1s, b1s, w2s = inputs
    E = 4
    plan = RoutingPlan.from_expert_ids(ids, E)
    copies = moe_ffn(x, plan, torch.cat([w1s.expand(E, -1, -1), w1], 1), torch.cat([b1s.expand(E, -1), b1], 1),
                     torch.cat([w2s.expand(E, -1, -1), w2], 2), b2, g)
    assert rel(call(inputs, plan), copies) < 1e-13
    untied_only = moe_ffn(x, plan, w1, b1, w2, b2, g)
    assert rel(untied_only, copies) > 1e-2  # the shared part is not negligible here


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("ids", [None, "empty"])
def test_gradcheck(gate, ids):
    T, E = 7, 3
    fixed = torch.tensor([0, 2, 0, 2, 2, 0, 0]) if ids == "empty" else None
    inputs, ids = make(T, 5, 4, 3, E, ids=fixed, gate=gate)
    plan = RoutingPlan.from_expert_ids(ids, E)
    present = [t.requires_grad_() for t in inputs if t is not None]

    def f(*ts):
        ts = list(ts)
        if not gate:
            ts.insert(5, None)
        return call(ts, plan)

    assert torch.autograd.gradcheck(f, present)


def test_opcheck():
    from torch.library import opcheck

    inputs, ids = make(11, 8, 6, 4, 3, dtype=torch.float32, gate=True, seed=2)
    x, w1, b1, w2, b2, g, w1s, b1s, w2s = inputs
    plan = RoutingPlan.from_expert_ids(ids, 3)
    tok, off = plan.sorted_token_ids, plan.expert_offsets
    shared = (w1s, b1s, w2s)
    for gate in (None, g):
        for save in (True, False):
            req = lambda t: t.clone().requires_grad_()  # noqa: E731
            args = (req(x), tok, off, *map(req, (w1, b1, w2, b2)), None if gate is None else req(gate), "gelu",
                    "torch", save, *map(req, shared))
            opcheck(torch.ops.moebert.moe_ffn_fwd.default, args)
        _, hidden, shared_hidden = torch.ops.moebert.moe_ffn_fwd(x, tok, off, w1, b1, w2, b2, gate, "gelu", "torch",
                                                                 True, *shared)
        assert shared_hidden.shape == (11, 4)
        for needs in ([True] * 9, [False, False, False, True, False, False, False, True, True]):
            bwd = (torch.randn(11, 8), x, tok, off, w1, b1, w2, b2, gate, hidden, "gelu", "torch", needs, *shared,
                   shared_hidden)
            opcheck(torch.ops.moebert.moe_ffn_bwd.default, bwd)


def test_backward_recomputes_the_shared_hidden_and_honours_needs():
    inputs, ids = make(19, 8, 6, 5, 3, gate=True, seed=3)
    x, w1, b1, w2, b2, g, w1s, b1s, w2s = inputs
    plan = RoutingPlan.from_expert_ids(ids, 3)
    tok, off = plan.sorted_token_ids, plan.expert_offsets
    dy = torch.randn(19, 8, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(loop(leaves, ids), leaves, dy)
    _, hidden, shared_hidden = torch.ops.moebert.moe_ffn_fwd(x, tok, off, w1, b1, w2, b2, g, "gelu", "torch", True,
                                                             w1s, b1s, w2s)
    for saved in (shared_hidden, x.new_empty(0), None):
        for needs in ("111111111", "100000000", "000001000", "000000111", "000000010", "100000100"):
            flags = [c == "1" for c in needs]
            got = torch.ops.moebert.moe_ffn_bwd(dy, x, tok, off, w1, b1, w2, b2, g, hidden, "gelu", "torch", flags,
                                                w1s, b1s, w2s, saved)
            for name, need, a, b in zip(NAMES, flags, got, want):
                if need:
                    assert rel(a, b) < 1e-12, (name, needs, saved is None)


def test_backward_does_not_zero_fill_the_saved_hiddens():
    T, d, h, s, E = 11, 6, 10, 7, 3
    inputs, ids = make(T, d, h, s, E, dtype=torch.float32, gate=True)
    params = [t.requires_grad_() for t in inputs]
    out = call(params, RoutingPlan.from_expert_ids(ids, E))
    log = OpLog()
    with log:
        out.square().sum().backward()
    zeros = [op for op in log.ops if op[0] in ("zeros.default", "zeros_like.default") and op[1] in ((T, h), (T, s))]
    assert not zeros, log.ops
    assert all(p.grad is not None for p in params)


def test_compile_fullgraph():
    inputs, ids = make(23, 8, 6, 4, 3, dtype=torch.float32, gate=True, seed=4)
    plan = RoutingPlan.from_expert_ids(ids, 3)
    leaves = [t.requires_grad_() for t in inputs]

    def f(*ts):
        return call(ts, plan).square().sum()

    eager = torch.autograd.grad(f(*leaves), leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for name, a, b in zip(NAMES, got, eager):
        assert rel(a, b) < 1e-6, name


def test_cuda_backend_takes_the_shared_expert():
    inputs, ids = make(5, 8, 6, 4, 2, dtype=torch.float32)
    # On CPU tensors the forced cuda backend fails for the device, not for the shared expert.
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors") as info:
        call(inputs, RoutingPlan.from_expert_ids(ids, 2), backend="cuda")
    assert "does not implement" not in str(info.value)
    from moebert_kernels.ops.dispatch import backend_status

    for backend in ("torch", "triton", "cuda"):
        assert "does not implement" not in backend_status("moe_ffn", backend, torch.device("cuda"), ("shared",))[1]


BAD = [
    (lambda a: a.update(shared_w2=None), ValueError, "together"),
    (lambda a: a.update(shared_w1=None, shared_w2=None), ValueError, "together"),
    (lambda a: a.update(shared_b1=None), ValueError, "shared_b1 must be given exactly when b1 is"),
    (lambda a: a.update(b1=None, b2=None), ValueError, "shared_b1 must be given exactly when b1 is"),
    (lambda a: a.update(activation="geglu", w1=a["w1"].repeat(1, 2, 1), b1=a["b1"].repeat(1, 2),
                        shared_w1=a["shared_w1"][:3], shared_b1=a["shared_b1"][:3]), ValueError,
     "shared_w1 must be \\[2s, d=8\\]"),
    (lambda a: a.update(shared_w1=a["shared_w1"][:, :-1]), ValueError, "shared_w1 must be"),
    (lambda a: a.update(shared_b1=a["shared_b1"][:-1]), ValueError, "shared_b1 must be"),
    (lambda a: a.update(shared_w2=a["shared_w2"][:-1]), ValueError, "shared_w2 must be"),
    (lambda a: a.update(shared_w2=a["shared_w2"].double()), TypeError, "shared_w2 has dtype"),
    (lambda a: a.update(shared_w1=a["shared_w1"].long()), TypeError, "shared_w1 must be a floating"),
    (lambda a: a.update(shared_w1=a["shared_w1"].to("meta")), ValueError, "shared_w1 is on meta"),
]


@pytest.mark.parametrize("mutate,exc,msg", BAD)
def test_bad_input(mutate, exc, msg):
    inputs, ids = make(10, 8, 6, 4, 4, dtype=torch.float32)
    x, w1, b1, w2, b2, _, w1s, b1s, w2s = inputs
    args = dict(x=x, plan=RoutingPlan.from_expert_ids(ids, 4), w1=w1, b1=b1, w2=w2, b2=b2, shared_w1=w1s,
                shared_b1=b1s, shared_w2=w2s)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    mutate(args)
    with pytest.raises(exc, match=msg):
        moe_ffn(**args)
    for k, v in snapshot.items():  # bad input never changes state
        assert torch.equal(v, dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, shared_w1=w1s, shared_b1=b1s, shared_w2=w2s)[k])
