import pytest
import torch
import torch.nn.functional as F

from moebert_kernels import BalancedHashRouter, HashRouter, MoEFeedForward, RoutingPlan, SentenceGate, TokenGate
from moebert_kernels.modules import switch_load_balancing_loss


def _moe(E=4, d=16, h=24, router=None, **kw):
    torch.manual_seed(torch.seed() % 2**31)
    m = MoEFeedForward(d, h, E, router=router, dropout=0.0, **kw)
    with torch.no_grad():  # non-trivial LayerNorm affine so a wrong expert's LN shows
        m.ln_weight.uniform_(0.5, 1.5)
        m.ln_bias.normal_()
    return m


def _loop(m: MoEFeedForward, x, ids, residual=None, probs=None):
    residual = x if residual is None else residual
    out = []
    for t in range(x.shape[0]):
        e = int(ids[t])
        y = m.w2[e] @ F.gelu(m.w1[e] @ x[t] + m.b1[e]) + m.b2[e]
        if probs is not None:
            y = y * probs[t]
        out.append(F.layer_norm(residual[t] + y, (m.hidden_size,), m.ln_weight[e], m.ln_bias[e], m.layer_norm_eps))
    return torch.stack(out)


def test_hash_router_table_is_seeded_buffer():
    a, b, c = HashRouter(50, 4, seed=1), HashRouter(50, 4, seed=1), HashRouter(50, 4, seed=2)
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, c.table)
    assert "table" in a.state_dict() and a.table.min() >= 0 and a.table.max() < 4
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(a(ids), a.table[ids])
    with pytest.raises(ValueError, match="vocabulary"):
        a(torch.tensor([50]))


def test_balanced_hash_router_balances_load():
    torch.manual_seed(0)
    counts = (1000 / torch.arange(1, 201).float()).long()  # Zipf-like frequencies
    r = BalancedHashRouter.from_token_counts(counts, 4)
    load = torch.zeros(4, dtype=torch.long).scatter_add_(0, r.table, counts)
    rand_load = torch.zeros(4, dtype=torch.long).scatter_add_(0, HashRouter(200, 4).table, counts)
    assert (load.max() - load.min()) <= counts.max()  # greedy LPT bound
    assert (load.max() - load.min()) < (rand_load.max() - rand_load.min())
    zero = BalancedHashRouter.from_token_counts(torch.zeros(8, dtype=torch.long), 4)
    assert sorted(zero.table.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # unseen tokens are dealt round-robin
    with pytest.raises(TypeError, match="integer"):
        BalancedHashRouter.from_token_counts(torch.rand(5), 4)
    with pytest.raises(ValueError, match="non-negative"):
        BalancedHashRouter.from_token_counts(torch.tensor([1, -1]), 4)


def test_switch_loss_values():
    probs = torch.full((8, 4), 0.25)
    ids = torch.arange(8) % 4
    assert torch.allclose(switch_load_balancing_loss(probs, ids), torch.tensor(1.0))  # balanced -> 1
    skew = torch.tensor([[1.0, 0, 0, 0]] * 8)
    assert torch.allclose(switch_load_balancing_loss(skew, torch.zeros(8, dtype=torch.long)), torch.tensor(4.0))


@pytest.mark.parametrize("E", [1, 4, 8])
def test_moe_feed_forward_with_plan_matches_loop(E):
    m = _moe(E)
    x = torch.randn(23, 16)
    ids = torch.randint(0, E, (23,))
    out = m(x, plan=RoutingPlan.from_expert_ids(ids, E))
    assert torch.allclose(out, _loop(m, x, ids), atol=1e-5, rtol=1e-5)


def test_moe_feed_forward_hash_routing_and_residual():
    r = HashRouter(30, 4, seed=5)
    m = _moe(4, router=r)
    x, res = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    input_ids = torch.randint(0, 30, (2, 5))
    out = m(x, res, input_ids=input_ids)
    ref = _loop(m, x.reshape(-1, 16), r(input_ids).reshape(-1), residual=res.reshape(-1, 16))
    assert out.shape == x.shape and torch.allclose(out.reshape(-1, 16), ref, atol=1e-5)
    assert m.aux_loss is None
    with pytest.raises(ValueError, match="input_ids"):
        m(x)


def test_token_gate_scales_by_probability_and_has_aux_loss():
    gate = TokenGate(16, 4)
    m = _moe(4, router=gate)
    x = torch.randn(31, 16, requires_grad=True)
    out = m(x)
    g = gate(x.detach())
    ref = _loop(m, x.detach(), g.expert_ids, probs=g.probs)
    assert torch.allclose(out, ref, atol=1e-5)
    assert m.aux_loss is not None and m.aux_loss.requires_grad
    (out.sum() + m.aux_loss).backward()
    assert gate.proj.weight.grad is not None and gate.proj.weight.grad.abs().sum() > 0


def test_sentence_gate_routes_whole_sequences_under_mask():
    gate = SentenceGate(16, 4)
    m = _moe(4, router=gate)
    x = torch.randn(3, 6, 16)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 3:] = 0
    out = m(x, attention_mask=mask)
    pooled = torch.stack([x[0].mean(0), x[1, :3].mean(0), x[2].mean(0)])
    probs = F.linear(pooled, gate.proj.weight, gate.proj.bias).softmax(-1)
    ids = probs.argmax(-1).repeat_interleave(6)
    ref = _loop(m, x.reshape(-1, 16), ids, probs=probs.max(-1).values.repeat_interleave(6))
    assert torch.allclose(out.reshape(-1, 16), ref, atol=1e-5)
    # padding after a sentence must not change its routing
    x2 = x.clone()
    x2[1, 3:] = 100.0
    assert torch.allclose(m(x2, attention_mask=mask)[1, :3], out[1, :3], atol=1e-5)


def test_moe_feed_forward_compiles_fullgraph():
    m = _moe(4).eval()
    x = torch.randn(17, 16)
    plan = RoutingPlan.from_expert_ids(torch.randint(0, 4, (17,)), 4)
    eager = m(x, plan=plan)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, plan=plan), eager, atol=1e-6)


def test_moe_feed_forward_compiles_fullgraph_with_hash_router_and_backward():
    r = HashRouter(40, 4)
    m = _moe(4, router=r)
    x = torch.randn(2, 9, 16, requires_grad=True)
    ids = torch.randint(0, 40, (2, 9))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x, input_ids=ids)
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    m.zero_grad()
    ref = m(ref_x, input_ids=ids)
    ref.sum().backward()
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(x.grad, ref_x.grad, atol=1e-5)


def test_module_rejects_bad_sizes():
    with pytest.raises(ValueError, match="expert_size"):
        MoEFeedForward(16, 0, 4)
    with pytest.raises(ValueError, match="activation"):
        MoEFeedForward(16, 8, 4, activation="swish")
    m = _moe(4)
    with pytest.raises(ValueError, match="d=16"):
        m(torch.randn(3, 15), plan=RoutingPlan.from_expert_ids(torch.zeros(3, dtype=torch.long), 4))


def test_autocast_runs_in_lower_precision():
    m = _moe(4)
    x = torch.randn(12, 16)
    plan = RoutingPlan.from_expert_ids(torch.randint(0, 4, (12,)), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, plan=plan)
    assert out.isfinite().all()
    assert torch.allclose(out.float(), m(x, plan=plan), atol=0.1)
