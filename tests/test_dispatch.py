import pytest
import torch

from moebert_kernels import BackendUnavailableError, select_backend
from moebert_kernels.ops import available_backends, backend_status


def test_cpu_default_is_torch():
    assert select_backend("moe_ffn", "cpu") == "torch"


def test_forced_by_argument_and_env(monkeypatch):
    assert select_backend("moe_ffn", "cpu", backend="torch") == "torch"
    monkeypatch.setenv("MOEBERT_BACKEND", "torch")
    assert select_backend("moe_ffn", "cpu") == "torch"


def test_unknown_backend_names_the_source(monkeypatch):
    with pytest.raises(ValueError, match="backend=.*'fast'"):
        select_backend("moe_ffn", "cpu", backend="fast")
    monkeypatch.setenv("MOEBERT_BACKEND", "fast")
    with pytest.raises(ValueError, match="MOEBERT_BACKEND"):
        select_backend("moe_ffn", "cpu")


def test_forced_cuda_on_cpu_says_why():
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        select_backend("moe_ffn", "cpu", backend="cuda")


def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = backend_status("moe_ffn", "triton", torch.device("cpu"))
    assert not ok and ("TRITON_INTERPRET" in why or "implementation" in why or "import" in why)
    with pytest.raises(BackendUnavailableError):
        select_backend("moe_ffn", "cpu", backend="triton")


def test_missing_implementation_is_reported():
    ok, why = backend_status("no_such_op", "triton", torch.device("cpu"))
    assert not ok and "no 'triton' implementation" in why
    with pytest.raises(BackendUnavailableError, match="no_such_op"):
        select_backend("no_such_op", "cpu", backend="cuda")


def test_available_backends_on_cpu():
    avail = available_backends("moe_ffn", "cpu")
    assert avail[-1] == "torch" and "cuda" not in avail


def test_moe_ffn_uses_forced_backend(monkeypatch):
    from moebert_kernels import RoutingPlan, moe_ffn
    from moebert_kernels.ops import dispatch

    calls = []
    real = dispatch.get_impl

    def spy(op, backend):
        calls.append((op, backend))
        return real(op, backend)

    import sys

    monkeypatch.setattr(sys.modules["moebert_kernels.ops.moe_ffn"], "get_impl", spy)
    x = torch.randn(4, 3)
    w1, b1, w2, b2 = torch.randn(2, 5, 3), torch.randn(2, 5), torch.randn(2, 3, 5), torch.randn(2, 3)
    moe_ffn(x, RoutingPlan.from_expert_ids(torch.tensor([0, 1, 1, 0]), 2), w1, b1, w2, b2, backend="torch")
    assert calls == [("moe_ffn", "torch")]


def test_backend_report_lists_every_backend_with_reasons():
    from moebert_kernels.__main__ import report

    text = report()
    for op in ("moe_ffn", "distill_loss"):
        assert f"{op} on cpu: default backend 'torch'" in text
    assert "cuda   unavailable: the cuda backend needs CUDA tensors" in text


def test_a_backend_lacking_a_needed_feature_is_skipped_or_refused():
    from moebert_kernels.ops import dispatch

    dispatch.register_impl("feature_probe_op", "torch", "moebert_kernels.ops.moe_ffn", features=("a",))
    try:
        assert select_backend("feature_probe_op", "cpu", needs=("a",)) == "torch"
        ok, why = backend_status("feature_probe_op", "torch", torch.device("cpu"), needs=("a", "b"))
        assert not ok and "does not implement b" in why
        with pytest.raises(BackendUnavailableError, match="does not implement b"):
            select_backend("feature_probe_op", "cpu", needs=("b",))
        with pytest.raises(BackendUnavailableError, match="does not implement b"):
            select_backend("feature_probe_op", "cpu", backend="torch", needs=("b",))
        dispatch.add_features("feature_probe_op", "torch", ("b",))
        assert select_backend("feature_probe_op", "cpu", needs=("a", "b")) == "torch"
    finally:
        dispatch._IMPLS.pop(("feature_probe_op", "torch"))
        dispatch._FEATURES.pop(("feature_probe_op", "torch"))
