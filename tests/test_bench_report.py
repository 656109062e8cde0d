"""benchmarks/report.py on small synthetic pytest-benchmark JSON: the numbers it prints must be right."""
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "benchmarks", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_report"] = mod
    spec.loader.exec_module(mod)
    return mod


def _bench(group, name, median, mn, **info):
    return {"group": group, "name": name, "fullname": f"benchmarks/x.py::{name}", "params": {},
            "stats": {"min": mn, "max": median * 2, "mean": median, "median": median, "stddev": 0.0, "rounds": 7},
            "extra_info": info}


def _moe(mode, T, impl, median, mn, device_type="cpu", dtype="float32", E=4, **more):
    g = f"moe_ffn {mode} T={T} E={E} {dtype}"
    return _bench(g, f"test_moe_ffn[{mode}-{E}-{T}-{impl}]", median, mn, kind="moe_ffn", impl=impl, mode=mode,
                  T=T, E=E, dtype=dtype, device_type=device_type, **more)


def _write(tmp_path, benchmarks, device_type="cpu", name="r.json"):
    data = {
        "machine_info": {"python_version": "3.11.0", "moebert": {
            "device_type": device_type, "cpu_model": "Test CPU", "torch_threads": 2, "torch": "2.13.0+cpu",
            "triton": "3.9.0", "cuda": "none", "command": "pytest benchmarks/ -q", "gpu": "NVIDIA H100",
            "gpu_sm": "9.0", "gpu_memory_gib": 79.1, "cpu_count": 2, "loadavg_start": [1.5, 1.0, 0.5],
            "loadavg_end": [2.25, 1.0, 0.5]}},
        "datetime": "2026-11-25T10:00:00.000000+00:00",
        "benchmarks": benchmarks,
    }
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


CPU_ROWS = [
    _moe("fwd", 128, "dense", 0.010, 0.008, tflops=0.1),
    _moe("fwd", 128, "loop", 0.004, 0.0032),
    _moe("fwd", 128, "padded_bmm", 0.003, 0.0025),
    _moe("fwd", 128, "torch", 0.0025, 0.002, tflops=0.12, frac_gemm_pair=0.9),
    _moe("fwd+bwd", 128, "dense", 0.030, 0.030),
    _moe("fwd+bwd", 128, "torch", 0.012, 0.010),
    _bench("e2e_infer 1x128 float32", "test_e2e_infer[1-dense]", 0.100, 0.090, kind="e2e_infer", impl="dense", B=1,
           device_type="cpu", moe_backend="none"),
    _bench("e2e_infer 1x128 float32", "test_e2e_infer[1-moe]", 0.040, 0.045, kind="e2e_infer", impl="moe", B=1,
           device_type="cpu", moe_backend="torch"),
    _bench("distill_loss 13x[32,128,768] bf16", "test_distill[eager]", 0.009, 0.009, kind="distill_loss",
           impl="eager", peak_mem_mib=300.0, L=13),
    _bench("distill_loss 13x[32,128,768] bf16", "test_distill[triton]", 0.003, 0.003, kind="distill_loss",
           impl="triton", peak_mem_mib=60.0, L=13),
]


def test_speedups_against_dense_and_loop(report, tmp_path):
    rows, env = report.load([_write(tmp_path, CPU_ROWS)])
    tables = report.moe_tables(rows, "median")
    fwd = {d["impl"]: d for d in tables[("fwd", 4, "float32")]}
    assert fwd["torch"]["vs_dense"] == pytest.approx(4.0)
    assert fwd["torch"]["vs_loop"] == pytest.approx(1.6)
    assert fwd["padded_bmm"]["vs_dense"] == pytest.approx(10 / 3)
    assert fwd["dense"]["vs_loop"] == pytest.approx(0.4)
    assert [d["impl"] for d in tables[("fwd", 4, "float32")]] == ["dense", "loop", "padded_bmm", "torch"]
    # the other statistic changes every ratio
    fwd_min = {d["impl"]: d for d in report.moe_tables(rows, "min")[("fwd", 4, "float32")]}
    assert fwd_min["torch"]["vs_dense"] == pytest.approx(4.0)
    assert fwd_min["torch"]["vs_loop"] == pytest.approx(1.6)
    assert fwd_min["padded_bmm"]["vs_dense"] == pytest.approx(3.2)
    assert ("fwd+bwd", 4, "float32") in tables
    both = {d["impl"]: d for d in tables[("fwd+bwd", 4, "float32")]}
    assert both["torch"]["vs_dense"] == pytest.approx(2.5)
    assert both["torch"]["vs_loop"] is None  # no loop row in that group
    assert env["device"] == "Test CPU, 2 torch threads"


def test_markdown_rows_and_targets(report, tmp_path):
    rows, env = report.load([_write(tmp_path, CPU_ROWS)])
    md = report.render(rows, env, "median", "CPU: test")
    assert "| 128 | torch | 2.50 ms | 2.00 ms | 0.120 | 0.90 | 4.00x | 1.60x |" in md
    assert "| 128 | dense | 10.00 ms | 8.00 ms | 0.100 | - | 1.00x | 0.40x |" in md
    assert "| e2e_infer 1x128 float32 | moe | torch | 40.00 ms | 45.00 ms | - | 2.50x |" in md
    # generic group: baseline is the eager row, numeric extra_info becomes a column
    assert "| impl | median | min | rounds | peak_mem_mib | x eager |" in md  # L=13 is the same in both rows
    assert "| triton | 3.00 ms | 3.00 ms | 7 | 60 | 3.00x |" in md
    assert "torch 2.13.0+cpu, triton 3.9.0, CUDA none" in md
    assert "2026-11-25 10:00:00" in md and "`pytest benchmarks/ -q`" in md
    assert "load average (1/5/15 min) at start 1.5/1/0.5, at end 2.25/1/0.5 on 2 CPUs" in md
    verdicts = {t: (m, v) for t, m, v in report.targets(rows, "median")}
    assert verdicts["CPU fp32 T=128 E=4 MoE-FFN fwd `torch` >= 3.8x dense FFN"] == ("4.00x", "met")
    assert verdicts["CPU fp32 T=128 E=4 MoE-FFN fwd `loop` >= 3.8x dense FFN"] == ("2.50x", "NOT met")
    assert verdicts["CPU fp32 T=128 E=4 MoE-FFN fwd `grouped_mm` >= 3.8x dense FFN"] == ("-", "not measured")
    assert verdicts["CPU end to end BERT-base 1x128 inference >= 2.2x"] == ("2.50x", "met")
    # by min, the end-to-end ratio is 90/45 = 2.0: not met
    verdicts = {t: (m, v) for t, m, v in report.targets(rows, "min")}
    assert verdicts["CPU end to end BERT-base 1x128 inference >= 2.2x"] == ("2.00x", "NOT met")


def test_gpu_targets(report, tmp_path):
    rows = []
    for T, (dense, loop, gmm, tri, frac, floor) in {
        128: (20e-6, 400e-6, 30e-6, 6e-6, 0.5, 1.5),
        4096: (200e-6, 2e-3, 70e-6, 50e-6, 0.9, None),
    }.items():
        kw = dict(device_type="cuda", dtype="bfloat16")
        rows += [_moe("fwd", T, "dense", dense, dense, **kw), _moe("fwd", T, "loop", loop, loop, **kw),
                 _moe("fwd", T, "grouped_mm", gmm, gmm, **kw),
                 _moe("fwd", T, "triton", tri, tri, frac_gemm_pair=frac, x_weight_floor=floor, **kw)]
    rows_, env = report.load([_write(tmp_path, rows, device_type="cuda")])
    v = {t: (m, x) for t, m, x in report.targets(rows_, "median")}
    assert v["GPU `triton` fwd >= 0.85x dense GEMM-pair rate (all T)"] == ("0.50 at T=128", "NOT met")
    assert v["GPU `triton` fwd >= 3.6x dense FFN at T >= 4k"] == ("4.00x at T=4096", "met")
    assert v["GPU `triton` fwd >= 10x loop dispatch (all T)"] == ("40.00x at T=4096", "met")
    assert v["GPU `triton` fwd faster than grouped_mm (all T)"] == ("1.40x at T=4096", "met")
    assert v["GPU `triton` fwd at T <= 1k <= 2x weight-read floor (+1 launch)"] == ("1.50x floor at T=128", "met")
    assert v["GPU `triton` fwd+bwd >= 3x dense FFN (all T)"] == ("-", "not measured")
    assert v["GPU `cuda` fwd >= 10x loop dispatch (all T)"] == ("-", "not measured")
    assert "NVIDIA H100 (sm_90, 79.1 GiB)" in env["device"]
    md = report.render(rows_, env, "median", "GPU")
    assert "| 128 | triton | 6.0 us | 6.0 us | - | 0.50 | 3.33x | 66.67x | 1.50 |" in md


def test_gpu_fraction_of_cublas_table(report, tmp_path):
    """cuda and triton at BERT-base shape (bf16, E=4, T 1k..64k), fwd and fwd+bwd: their fraction of cuBLAS."""
    kw = dict(device_type="cuda", dtype="bfloat16", d=768, h=768)
    rows = []
    for i, T in enumerate((1024, 4096, 16384, 65536)):
        rows += [_moe("fwd", T, "triton", 1e-4, 1e-4, frac_gemm_pair=0.4 + i / 10, **kw),
                 _moe("fwd+bwd", T, "triton", 3e-4, 3e-4, frac_gemm_pair=0.3 + i / 10, **kw),
                 _moe("fwd", T, "cuda", 1e-3, 1e-3, frac_gemm_pair=0.05 + i / 100, **kw),
                 _moe("fwd", T, "dense", 1e-4, 1e-4, frac_gemm_pair=0.99, **kw)]
    rows += [_moe("fwd", 128, "triton", 1e-5, 1e-5, frac_gemm_pair=0.11, **kw),  # not a BERT-base batch
             _moe("fwd", 1024, "cuda", 1e-3, 1e-3, frac_gemm_pair=0.77, E=8, **kw),  # E=8
             _moe("fwd", 4096, "triton", 1e-3, 1e-3, frac_gemm_pair=0.66, device_type="cpu", dtype="bfloat16")]
    rows_, env = report.load([_write(tmp_path, rows, device_type="cuda")])
    fr = report.cublas_fractions(rows_)
    assert list(fr) == [1024, 4096, 16384, 65536]
    assert fr[1024] == {("triton", "fwd"): 0.4, ("triton", "fwd+bwd"): 0.3, ("cuda", "fwd"): 0.05}
    assert fr[65536][("triton", "fwd")] == pytest.approx(0.7)
    md = report.render(rows_, env, "median", "GPU")
    assert "### MoE-FFN kernels as a fraction of cuBLAS (bf16, E=4, d=h=768)" in md
    assert "| T | triton fwd | triton fwd+bwd | cuda fwd | cuda fwd+bwd |" in md
    assert "| 1024 | 0.40 | 0.30 | 0.05 | - |" in md
    assert "| 16384 | 0.60 | 0.50 | 0.07 | - |" in md
    assert "| 128 |" not in md.split("fraction of cuBLAS")[1].split("###")[0]
    # no GPU rows: no table
    cpu, env = report.load([_write(tmp_path, CPU_ROWS, name="cpu.json")])
    assert report.cublas_fractions(cpu) == {} and "fraction of cuBLAS" not in report.render(cpu, env, "median", "CPU")


def test_section_is_replaced_not_duplicated(report, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nhand-written intro\n")
    report.write_section(str(out), "cpu", "## CPU one\n")
    report.write_section(str(out), "gpu", "## GPU\n")
    report.write_section(str(out), "cpu", "## CPU two\n")
    text = out.read_text()
    assert "hand-written intro" in text and "## GPU" in text and "## CPU two" in text
    assert "## CPU one" not in text
    assert text.count("<!-- bench:cpu:start -->") == 1
    assert text.index("## CPU two") < text.index("## GPU")  # replaced in place


def test_main_writes_report_and_handles_plot(report, tmp_path, capsys):
    path = _write(tmp_path, CPU_ROWS)
    out, png = tmp_path / "B.md", tmp_path / "plot.png"
    rc = report.main([path, str(tmp_path / "missing.json"), "--out", str(out), "--plot", str(png),
                      "--stat", "min", "--command", "pytest benchmarks/ -q --x"])
    assert rc == 0
    text = out.read_text()
    assert "`pytest benchmarks/ -q --x`" in text and "Times are the min over rounds" in text
    assert "| 128 | torch | 2.00 ms | 2.50 ms |" in text  # by min; the median beside it
    try:
        import matplotlib  # noqa: F401
        has_mpl = True
    except ImportError:
        has_mpl = False
    if has_mpl:
        assert png.exists() and png.stat().st_size > 1000 and "](plot.png)" in text
    else:
        assert not png.exists() and "Plot skipped: matplotlib is not installed." in text
    assert "missing.json does not exist" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing.json")]) == 1


def test_gpu_first_run_rows_keep_their_order(report, tmp_path):
    """The GPU benchmark's rows: the equal-FLOPs dense FFN first, each eager row before its CUDA-graph row."""
    rows, _ = report.load([_write(tmp_path, [
        _moe("fwd+bwd", 1024, impl, t, t, device_type="cuda", dtype="bfloat16", frac_gemm_pair=0.5)
        for impl, t in (("triton+graph", 1.0), ("cuda", 3.0), ("loop", 4.0), ("triton", 1.2), ("dense_equal", 0.6),
                        ("grouped_mm+graph", 1.5), ("grouped_mm", 1.6))], device_type="cuda")])
    table = report.moe_tables(rows, "median")[("fwd+bwd", 4, "bfloat16")]
    assert [d["impl"] for d in table] == ["dense_equal", "loop", "grouped_mm", "grouped_mm+graph", "triton",
                                         "triton+graph", "cuda"]
    assert all(d["frac_gemm_pair"] == 0.5 for d in table)
