"""Tuned Triton configs as data: the tuner's dry run writes a file, the loader reads it back, the
launchers use it for a matching GPU, and everything else falls back to the heuristic."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from moebert_kernels.triton import configs  # noqa: E402
from moebert_kernels.triton import moe_ffn as tm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tune_triton  # noqa: E402

SHAPE = dict(d=768, h=3072, E=4)
GPU = "Fake_GPU_80GB"


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    """A dry-run tuning of SHAPE for GPU, written to a folder the loader is pointed at."""
    assert tune_triton.main(["--dry-run", "--out", str(tmp_path), "--device-name", GPU, "--tokens", "1024", "16384",
                             "--dtype", "bfloat16", "float32", "--max-candidates", "12"]) == 0
    monkeypatch.setenv(configs.CONFIG_DIR_ENV, str(tmp_path))
    return tmp_path


def _file(folder):
    return folder / configs.config_file_name("moe_ffn", SHAPE, GPU)


def test_dry_run_writes_the_cheapest_candidate_and_the_loader_reads_it(tuned_dir):
    data = json.loads(_file(tuned_dir).read_text())
    assert data["meta"]["device_name"] == GPU and data["meta"]["dry_run"] is True
    assert not list(tuned_dir.glob("*.tmp")), "the temp file of the whole-file write was left behind"
    for kind in tm._KINDS:
        for dtype_name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
            for T in (1024, 16384):
                entry = data["configs"][kind][dtype_name][str(T)]
                got = tm.get_config(kind, T, SHAPE["d"], SHAPE["h"], SHAPE["E"], dtype, gpu=GPU)
                assert got == tm.MoEFFNConfig(**entry)
                # The tuner kept the argmin of its timer over the pool it searched.
                ref = tm._default_config(kind, T, SHAPE["d"], SHAPE["h"], SHAPE["E"], dtype, False)
                pool = tune_triton.nearest(tune_triton.candidates(kind, T, SHAPE["E"], dtype,
                                                                  tune_triton.SMEM_BYTES[9]) + [ref], ref, 12)
                best = min(tune_triton.fake_time(kind, c, T, SHAPE["d"], SHAPE["h"], SHAPE["E"]) for c in pool)
                assert tune_triton.fake_time(kind, got, T, SHAPE["d"], SHAPE["h"], SHAPE["E"]) == best
    # Nearest bucket: 3000 tokens -> the 1024 entry (|3000-1024| < |3000-16384|), 12000 -> 16384.
    for T, key in ((3000, "1024"), (12000, "16384")):
        assert tm.get_config("gemm", T, 768, 3072, 4, torch.bfloat16, gpu=GPU) == \
            tm.MoEFFNConfig(**data["configs"]["gemm"]["bfloat16"][key])


def test_fallbacks_and_overrides(tuned_dir):
    heuristic = tm._default_config("dw", 4096, 768, 3072, 4, torch.bfloat16, tm._interpreting())
    for gpu, shape in ((None, (768, 3072, 4)), ("Other_GPU", (768, 3072, 4)), (GPU, (1024, 4096, 4))):
        assert tm.get_config("dw", 4096, *shape[:2], shape[2], torch.bfloat16, gpu=gpu) == \
            tm._default_config("dw", 4096, *shape, torch.bfloat16, tm._interpreting())
    assert tm.get_config("dw", 4096, 768, 3072, 4, torch.bfloat16, gpu=None) == heuristic
    # float16 was not tuned: heuristic for it, even on the tuned GPU and shape.
    assert tm.get_config("gemm", 4096, 768, 3072, 4, torch.float16, gpu=GPU) == \
        tm._default_config("gemm", 4096, 768, 3072, 4, torch.float16, tm._interpreting())
    custom = tm.MoEFFNConfig(16, 16, 16)
    with tm.override_config(dw=custom):
        assert tm.get_config("dw", 4096, 768, 3072, 4, torch.bfloat16, gpu=GPU) is custom
    with tm.override_config(gemm=custom):  # hidden follows a gemm override unless given its own
        assert tm.get_config("hidden", 4096, 768, 3072, 4, torch.bfloat16, gpu=GPU) is custom


def test_user_folder_wins_over_the_package_and_bad_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.CONFIG_DIR_ENV, str(tmp_path))
    path = _file(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable.*tune_triton"):
        tm.get_config("gemm", 1024, 768, 3072, 4, torch.bfloat16, gpu=GPU)
    configs._load.cache_clear()
    path.write_text(json.dumps({"configs": {"gemm": {"bfloat16": {"1024": {"block_m": 64}}}}}))
    with pytest.raises(ValueError, match="malformed.*missing"):
        tm.get_config("gemm", 1024, 768, 3072, 4, torch.bfloat16, gpu=GPU)
    configs._load.cache_clear()
    bad = dict(block_m=48, block_n=64, block_k=64, num_warps=4, num_stages=3)
    path.write_text(json.dumps({"configs": {"gemm": {"bfloat16": {"1024": bad}}}}))
    with pytest.raises(ValueError, match="power of two.*Fake_GPU"):
        tm.get_config("gemm", 1024, 768, 3072, 4, torch.bfloat16, gpu=GPU)
    configs._load.cache_clear()


def test_candidates_respect_registers_and_shared_memory():
    for kind in tm._KINDS:
        for dtype in (torch.bfloat16, torch.float32):
            cands = tune_triton.candidates(kind, 4096, 4, dtype, tune_triton.SMEM_BYTES[8])
            assert cands
            elem = 4 if dtype == torch.float32 else 2
            for c in cands:
                assert c.block_m * c.block_n / (32 * c.num_warps) <= tune_triton.MAX_ACC_PER_THREAD[kind]
                assert c.num_stages * (c.block_m * c.block_k + c.block_k * c.block_n) * elem <= \
                    tune_triton.SMEM_BYTES[8]
    # Tiny batches: no row tile taller than an expert's share (32 tokens / 4 experts -> 16 rows).
    assert {c.block_m for c in tune_triton.candidates("gemm", 32, 4, torch.bfloat16, 232448)} == {16}


HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="triton needs a CUDA device or TRITON_INTERPRET=1")
def test_a_tuned_file_drives_the_launchers(tmp_path, monkeypatch):
    """The launchers look the GPU's file up: a file for a (pretend) GPU with tiny tiles is what a
    patched tiny BERT-size layer runs with, and its output and grads still match the reference."""
    from moebert_kernels import ops
    from moebert_kernels.ops import RoutingPlan, moe_ffn_reference

    T, d, h, E = 37, 40, 24, 3
    tiny = dict(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2, chunk=16)
    table = {kind: {"float32": {"64": tiny}} for kind in tm._KINDS}
    configs.write_table(str(tmp_path), "moe_ffn", dict(d=d, h=h, E=E), GPU, table, {"command": "test"})
    monkeypatch.setenv(configs.CONFIG_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(tm, "gpu_name", lambda device: GPU)
    seen = []
    real = tm._tuned_config
    monkeypatch.setattr(tm, "_tuned_config", lambda *a: seen.append(a[0]) or real(*a))

    g = torch.Generator().manual_seed(3)
    dev = "cuda" if HAS_CUDA else "cpu"
    x, gate = torch.randn(T, d, generator=g).to(dev), (torch.rand(T, generator=g) + 0.1).to(dev)
    w1, b1 = (torch.randn(E, h, d, generator=g) * d ** -0.5).to(dev), torch.randn(E, h, generator=g).to(dev)
    w2, b2 = (torch.randn(E, d, h, generator=g) * h ** -0.5).to(dev), torch.randn(E, d, generator=g).to(dev)
    plan = RoutingPlan.from_expert_ids(torch.randint(0, E, (T,), generator=g).to(dev), E)
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2, gate)]
    out = ops.moe_ffn(leaves[0], plan, *leaves[1:5], gate=leaves[5], backend="triton")
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = moe_ffn_reference(ref_leaves[0], plan.sorted_token_ids, plan.expert_offsets, *ref_leaves[1:5],
                            ref_leaves[5], "gelu")
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    assert set(seen) == set(tm._KINDS), seen
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-5
