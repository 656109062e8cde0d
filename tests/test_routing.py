import pytest
import torch

from moebert_kernels import RoutingPlan
from moebert_kernels.ops.routing import plans_from_expert_ids


def _golden(ids: torch.Tensor, E: int):
    order = [t for e in range(E) for t in range(len(ids)) if ids[t] == e]
    counts = [int((ids == e).sum()) for e in range(E)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return order, counts, offsets


@pytest.mark.parametrize("T,E", [(1, 1), (1, 4), (37, 4), (64, 8), (200, 3), (1000, 4)])  # T=1000: an unstable CPU sort reorders
def test_plan_matches_golden(T, E):
    ids = torch.randint(0, E, (T,))
    plan = RoutingPlan.from_expert_ids(ids, E)
    order, counts, offsets = _golden(ids, E)
    assert plan.sorted_token_ids.tolist() == order  # stable: token order kept inside an expert
    assert plan.expert_counts.tolist() == counts
    assert plan.expert_offsets.tolist() == offsets
    assert torch.equal(plan.sorted_token_ids[plan.inverse], torch.arange(T))
    assert torch.equal(plan.expert_ids, ids)
    assert plan.num_tokens == T and plan.num_experts == E


def test_plan_empty_expert_and_all_on_one():
    ids = torch.full((9,), 2)
    plan = RoutingPlan.from_expert_ids(ids, 4)
    assert plan.expert_counts.tolist() == [0, 0, 9, 0]
    assert plan.expert_offsets.tolist() == [0, 0, 0, 9, 9]
    assert plan.sorted_token_ids.tolist() == list(range(9))


def test_batched_plans_equal_single():
    ids = torch.randint(0, 4, (3, 50))
    plans = plans_from_expert_ids(ids, 4)
    for i, p in enumerate(plans):
        q = RoutingPlan.from_expert_ids(ids[i], 4)
        for f in ("expert_ids", "sorted_token_ids", "expert_counts", "expert_offsets", "inverse"):
            assert torch.equal(getattr(p, f), getattr(q, f)), f


def test_plan_is_deterministic():
    ids = torch.randint(0, 4, (500,))
    a, b = RoutingPlan.from_expert_ids(ids, 4), RoutingPlan.from_expert_ids(ids.clone(), 4)
    assert torch.equal(a.sorted_token_ids, b.sorted_token_ids)


def test_plan_builds_without_host_sync(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("host sync in RoutingPlan construction")

    ids = torch.randint(0, 4, (20,))
    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    RoutingPlan.from_expert_ids(ids, 4, validate=False)


@pytest.mark.parametrize("bad,msg", [(torch.tensor([0, 4, 1]), "outside"), (torch.tensor([-1, 0]), "outside")])
def test_plan_rejects_out_of_range(bad, msg):
    with pytest.raises(ValueError, match=msg):
        RoutingPlan.from_expert_ids(bad, 4)


def test_plan_rejects_bad_types():
    with pytest.raises(TypeError, match="integer"):
        RoutingPlan.from_expert_ids(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="1-D"):
        RoutingPlan.from_expert_ids(torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="num_experts"):
        RoutingPlan.from_expert_ids(torch.zeros(3, dtype=torch.long), 0)
