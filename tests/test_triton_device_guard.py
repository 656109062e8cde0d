"""Every Triton launch runs with its tensors' CUDA device current.

Triton launches on the current device and its stream; with tensors on cuda:1 while cuda:0 is current the
result is an illegal address or a wrong-stream launch. On CPU (TRITON_INTERPRET=1) ``torch.cuda.device`` is
replaced by a recorder and every kernel of the three Triton modules by a spy that notes whether a device
context was open at its launch.
"""
import contextlib
import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

from moebert_kernels.ops import RoutingPlan, moe_ffn  # noqa: E402
from moebert_kernels.ops.distill_loss import distill_loss  # noqa: E402
from moebert_kernels.ops.expert_layer_norm import expert_layer_norm  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU check under TRITON_INTERPRET=1 with a mocked torch.cuda.device")

# The launchers' modules; a launched kernel is a triton.jit function named *_kernel there.
MODULES = ("moebert_kernels.triton.moe_ffn", "moebert_kernels.triton.expert_layer_norm",
           "moebert_kernels.triton.distill_loss")


class _Spy:
    def __init__(self, kernel, name, launches, depth):
        self.kernel, self.name, self.launches, self.depth = kernel, name, launches, depth

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append((self.name, self.depth[0]))
            return launch(*args, **kwargs)
        return run


@pytest.fixture
def launches(monkeypatch):
    """[(kernel name, open device contexts at launch)], filled by every Triton launch."""
    import triton

    log, depth = [], [0]

    @contextlib.contextmanager
    def device(d):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(torch.cuda, "device", device)
    kernel_types = tuple(type(f) for f in (triton.jit(lambda: None),))
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and isinstance(obj, kernel_types):
                monkeypatch.setattr(mod, name, _Spy(obj, name, log, depth))
    return log


def _check(launches, expect):
    names = {n for n, _ in launches}
    assert set(expect) <= names, f"launched {sorted(names)}, expected {expect}"
    outside = [n for n, d in launches if d == 0]
    assert not outside, f"launched with no device context: {outside}"


def test_moe_ffn_launches_inside_a_device_context(launches):
    g = torch.Generator().manual_seed(0)
    T, d, h, E = 20, 16, 32, 3
    plan = RoutingPlan.from_expert_ids(torch.randint(0, E, (T,), generator=g), E)
    leaves = [torch.randn(*s, generator=g).requires_grad_() for s in ((T, d), (E, h, d), (E, h), (E, d, h), (E, d))]
    gate = torch.rand(T, generator=g).requires_grad_()
    moe_ffn(leaves[0], plan, *leaves[1:], gate=gate, backend="triton").sum().backward()
    _check(launches, ["_moe_ffn_up_kernel", "_moe_ffn_down_kernel", "_moe_ffn_bwd_hidden_kernel",
                      "_moe_ffn_dw_kernel"])


def test_expert_layer_norm_launches_inside_a_device_context(launches):
    x = torch.randn(9, 16, requires_grad=True)
    w = torch.ones(2, 16, requires_grad=True)
    b = torch.zeros(2, 16, requires_grad=True)
    expert_layer_norm(x, torch.tensor([0, 1] * 4 + [0]), w, b, backend="triton").sum().backward()
    _check(launches, ["_eln_fwd_kernel", "_eln_bwd_kernel"])


def test_distill_loss_launches_inside_a_device_context(launches):
    sh = [torch.randn(2, 3, 8, requires_grad=True) for _ in range(2)]
    th = [torch.randn(2, 3, 8) for _ in range(2)]
    sl = torch.randn(2, 4, requires_grad=True)
    loss = distill_loss(sh, th, sl, torch.randn(2, 4), torch.tensor([1, 3]), backend="triton")[0]
    loss.backward()
    _check(launches, ["_distill_hidden_fwd_kernel", "_distill_logits_fwd_kernel"])
