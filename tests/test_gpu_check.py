"""scripts/gpu_check.sh in its dry run: the logic a lent GPU machine would otherwise be first to test.

GPU_CHECK_DRY_RUN=1 replaces every stage's command by a stub (pass, fail, time out or "Device not supported" on
request) and makes time virtual (each stage costs what GPU_CHECK_DRY_RUN_COST says), so a run takes well under
a second and the budget arithmetic is exact. Checked: stage order, the limits, the verdicts, the failing
stage's log tail on stdout, the files left in OUTDIR and the tarball's contents, GPU_CHECK_SKIP, the default
interpreter and CPATH.
"""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# The GPU test files in run order: three before the secondary benchmarks (they never ran in the first GPU run,
# 2026-12-04, when the benchmarks took the budget), the rest after the report.
FIRST_GPU_FILES = [f for f in ["expert_layer_norm", "cuda_ext", "triton_moe_ffn"]
                   if (ROOT / "tests" / f"test_{f}.py").exists()]
LATER_GPU_FILES = [f for f in ["distill_loss", "triton_moe_ffn_shared", "triton_device_guard", "families"]
                   if (ROOT / "tests" / f"test_{f}.py").exists()]
GPU_FILES = FIRST_GPU_FILES + LATER_GPU_FILES
BENCHES = [b for b in ["end_to_end", "distill_loss", "expert_layer_norm", "tied", "moe_ffn_gated"]
           if (ROOT / "benchmarks" / f"test_bench_{b}.py").exists()]
ORDER = (["env", "build", "warmup", "kernel-report", "verdicts", "bench-moe_ffn", "sanitize"]
         + [f"gpu-{f}" for f in FIRST_GPU_FILES] + [f"bench-{b}" for b in BENCHES] + ["report"]
         + [f"gpu-{f}" for f in LATER_GPU_FILES]
         + (["demo"] if (ROOT / "carry" / "minilm").is_dir() else []))
RETURNED = {"gpu_check.tar.gz", "summary.md", "bench_moe_ffn.json", "kernel_report.json", "BENCHMARKS.md",
            "moe_ffn_gpu.png"}
# The issue's stage costs (22: "plausible stage costs") and the warm-up's, from a measured compile: 94 bf16
# kernels (sm_90a + sm_80) took 719 s with 2 processes on this CPU machine's 2 busy vCPUs, 15.3 s per kernel and
# process; the warm-up compiles the 47 sm_90a ones with 16 processes: 3 waves, 46 s.
ISSUE_COSTS = {"env": 5, "build": 90, "warmup": 46, "verdicts": 90, "bench-moe_ffn": 150, "sanitize": 95,
               "gpu-triton_moe_ffn": 160, "kernel-report": 150}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash script")


def run(tmp_path, name="out", python=sys.executable, **env):
    out = tmp_path / name
    e = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK", "CPATH"))}
    e.update(GPU_CHECK_DRY_RUN="1", TMPDIR=str(tmp_path))
    if python is not None:
        e["PYTHON"] = python
    e.update(env)
    res = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=tmp_path, env=e, capture_output=True, text=True,
                         timeout=60)
    return res, out


def summary(out: Path) -> dict:
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("stage", "---"):
            rows[cells[0]] = dict(status=cells[1], secs=int(cells[2]), limit=int(cells[3]), note=cells[4])
    return rows


def plan(stdout: str):
    m = re.search(r"plan \(budget (\d+)s, reserve (\d+)s\)", stdout)
    stages = [(n, int(c), int(f)) for n, c, f in re.findall(r"^  plan (\S+) (\d+) (\d+)", stdout, re.M)]
    return int(m.group(1)), int(m.group(2)), stages


def background(stdout: str) -> set:
    return set(re.findall(r"^  plan (\S+) \d+ \d+ background", stdout, re.M))


def expected_limits(stdout, costs=None, timeouts=(), skip=()):
    """Replays the script's budget rule: {stage: limit, or None for a "no time left" SKIP}."""
    budget, reserve, stages = plan(stdout)
    bg = background(stdout)
    costs = costs or {}
    elapsed, want = 0, {}
    for i, (name, cap, floor) in enumerate(stages):
        if name in skip:
            continue
        left = budget - reserve - elapsed
        limit = min(cap, left - sum(f for n, _, f in stages[i + 1:] if n not in skip))
        if limit < floor:
            limit = min(floor, left)
        if name in bg:  # beside the others: it only has to end with the budget, and costs them nothing
            want[name] = min(cap, left) if min(cap, left) >= 10 else None
            continue
        if limit < 10:
            want[name] = None
            continue
        want[name] = limit
        elapsed += limit if name in timeouts else min(costs.get(name, 1), limit)
    return want, elapsed


def test_every_stage_runs_in_order_and_returns_at_most_8_files(tmp_path):
    res, out = run(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ran = re.findall(r"^== \[(\S+)\] \(limit", res.stdout, re.M)
    assert ran == ORDER
    assert [n for n, _, _ in plan(res.stdout)[2]] == ORDER
    assert all(r["status"] == "PASS" for r in summary(out).values()) and list(summary(out)) == ORDER
    assert {p.name for p in out.iterdir()} == RETURNED  # at most 8 files come back; nothing hidden either
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    want = {f"{s}.log" for s in ORDER} | {"setup.log", "summary.md", "verdicts.xml", "kernel_report.md"}
    want |= {f"gpu-{f}.xml" for f in GPU_FILES} | {f"bench_{b}.json" for b in BENCHES}
    assert want <= names, want - names
    assert "DRY RUN" in (out / "summary.md").read_text()


def test_gpu_files_run_one_process_each_cuda_cpp_with_launch_blocking(tmp_path):
    res, _ = run(tmp_path)
    cmds = dict(re.findall(r"^== \[(\S+)\] \(limit \d+s\) (.*)$", res.stdout, re.M))
    for f in GPU_FILES:
        cmd = cmds[f"gpu-{f}"]
        assert cmd.count("-m pytest") == 1 and re.findall(r"tests/test_\w+\.py", cmd) == [f"tests/test_{f}.py"]
        assert cmd.startswith("CUDA_LAUNCH_BLOCKING=1 ") == (f == "cuda_ext"), cmd
    assert re.findall(r"tests/test_\w+\.py", cmds["verdicts"]) == ["tests/test_gpu_verdicts.py"]
    assert not [c for c in cmds.values() if re.search(r"pytest\S* .*\btests(/| |$)(?!test_)", c)]  # no CPU suite
    assert cmds["sanitize"].endswith("scripts/sanitize_case.py --backends cuda")  # the CUDA C++ path only


def test_budget_limits_and_verdicts(tmp_path):
    costs = {"build": 200, "verdicts": 90, "gpu-triton_moe_ffn": 56, "bench-end_to_end": 24, "report": 99}
    timeouts = ("sanitize", "bench-moe_ffn")
    env = dict(GPU_CHECK_DRY_RUN_COST=" ".join(f"{k}={v}" for k, v in costs.items()),
               GPU_CHECK_DRY_RUN_TIMEOUT=" ".join(timeouts), GPU_CHECK_DRY_RUN_FAIL="bench-distill_loss")
    res, out = run(tmp_path, **env)
    assert res.returncode == 1
    want, elapsed = expected_limits(res.stdout, costs, timeouts)
    budget, reserve, _ = plan(res.stdout)
    got = summary(out)
    for name, limit in want.items():
        if limit is None:
            assert got[name]["status"] == "SKIP" and "no time left" in got[name]["note"], (name, got[name])
        else:
            assert got[name]["limit"] == limit, (name, got[name], limit)
    assert any(v is None for v in want.values()), "the scenario should run out of time before the end"
    assert elapsed <= budget - reserve
    assert got["sanitize"]["status"] == "TIMEOUT" and got["bench-moe_ffn"]["status"] == "TIMEOUT"
    assert got["sanitize"]["secs"] == got["sanitize"]["limit"]
    assert got["bench-distill_loss"]["status"] == "FAIL(1)"
    assert got["report"]["status"] == "TIMEOUT"  # it would have run past its limit
    assert got["verdicts"]["status"] == "PASS" and got["verdicts"]["limit"] == want["verdicts"] >= 90
    assert all(r["secs"] <= r["limit"] for r in got.values())


def test_squeezed_stage_still_gets_its_floor(tmp_path):
    """Short of time (a 300 s budget), the verdicts keep their floor; the later stages make do with less."""
    costs = {"build": 60, "bench-moe_ffn": 150}
    res, out = run(tmp_path, GPU_CHECK_BUDGET_S="300",
                   GPU_CHECK_DRY_RUN_COST=" ".join(f"{k}={v}" for k, v in costs.items()))
    budget, reserve, stages = plan(res.stdout)
    later = sum(f for n, _, f in stages[ORDER.index("verdicts") + 1:])
    assert budget - reserve - 62 - later < 60  # after env, build and warm-up, less than the verdicts' floor is free
    want, _ = expected_limits(res.stdout, costs)
    got = summary(out)
    assert got["verdicts"]["status"] == "PASS" and got["verdicts"]["limit"] == want["verdicts"] == 60
    assert got["sanitize"]["limit"] == want["sanitize"] < 90


def test_failed_stage_prints_its_log_tail(tmp_path):
    res, out = run(tmp_path, GPU_CHECK_DRY_RUN_FAIL="verdicts", GPU_CHECK_DRY_RUN_TIMEOUT="gpu-cuda_ext")
    assert res.returncode == 1
    for name, last in (("verdicts", "FAILED as requested"), ("gpu-cuda_ext", "TIMEOUT as requested")):
        block = res.stdout.split(f"---- last 40 lines of {name}.log ----\n")[1].split(f"---- end of {name}.log")[0]
        lines = block.splitlines()
        assert len(lines) == 40 and lines[-1] == f"{name}: dry-run {last}"
        assert lines[0] == f"{name}: dry-run log line 12 of 50"
    assert "last 40 lines of build.log" not in res.stdout  # passing stages stay quiet
    assert summary(out)["gpu-cuda_ext"]["status"] == "TIMEOUT"


def test_unsupported_sanitizer_is_a_skip_with_its_reason(tmp_path):
    res, out = run(tmp_path, GPU_CHECK_DRY_RUN_UNSUPPORTED="sanitize")
    row = summary(out)["sanitize"]
    assert row["status"] == "SKIP" and "Device not supported" in row["note"]
    assert res.returncode == 0  # not a failure of the code under test
    assert "last 40 lines of sanitize.log" not in res.stdout


def test_skip_requested_and_a_second_run_into_the_same_outdir(tmp_path):
    res, out = run(tmp_path, GPU_CHECK_SKIP="build verdicts sanitize gpu-tests bench-*")
    assert res.returncode == 0
    got = summary(out)
    skipped = {n for n, r in got.items() if r["status"] == "SKIP"}
    assert skipped == {n for n in ORDER if n in ("build", "verdicts", "sanitize") or n.startswith(("gpu-", "bench-"))}
    assert all(got[n]["note"] == "GPU_CHECK_SKIP" for n in skipped)
    assert re.findall(r"^== \[(\S+)\] \(limit", res.stdout, re.M) == [n for n in ORDER if n not in skipped]
    want, _ = expected_limits(res.stdout, skip=skipped)
    assert all(got[n]["limit"] == want[n] for n in want)
    res2, out2 = run(tmp_path)  # warm machine, same OUTDIR
    assert res2.returncode == 0 and out2 == out
    assert {p.name for p in out.iterdir()} == RETURNED
    assert all(r["status"] == "PASS" for r in summary(out).values())


def test_default_python3_and_cpath_from_pip_cuda_headers(tmp_path):
    inc = tmp_path / "site" / "nvidia" / "cu13" / "include"
    inc.mkdir(parents=True)
    (inc / "cusparse.h").write_text("")
    toolkit = tmp_path / "cuda"
    (toolkit / "include").mkdir(parents=True)
    res, out = run(tmp_path, CUDA_HOME=str(toolkit), PYTHONPATH=str(tmp_path / "site"))
    assert f"CPATH: the toolkit lacks cusparse.h; prepended the pip CUDA headers: {inc}" in res.stdout
    (toolkit / "include" / "cusparse.h").write_text("")
    res, _ = run(tmp_path, name="out2", python=None, CUDA_HOME=str(toolkit))
    assert "CPATH: unchanged (the toolkit has cusparse.h)" in res.stdout
    assert re.search(r"^python: python3 ", res.stdout, re.M)
    assert "python3 -m pytest -q" in res.stdout


def test_issue_costs_leave_the_moe_ffn_benchmark_150s_and_bring_back_its_json_and_the_report(tmp_path):
    """Issue 22's replay: with its stage costs (and the warm-up's measured one) the speed numbers come back."""
    env = dict(GPU_CHECK_DRY_RUN_COST=" ".join(f"{k}={v}" for k, v in ISSUE_COSTS.items()))
    res, out = run(tmp_path, **env)
    got = summary(out)
    want, _ = expected_limits(res.stdout, ISSUE_COSTS)
    assert all(got[n]["limit"] == want[n] for n in want if want[n] is not None), (got, want)
    order = re.findall(r"^== \[(\S+)\] \(limit", res.stdout, re.M)
    assert order[:7] == ["env", "build", "warmup", "kernel-report", "verdicts", "bench-moe_ffn", "sanitize"]
    bench = got["bench-moe_ffn"]
    assert bench["limit"] >= 150 and bench["status"] == "PASS" and bench["secs"] == 150, bench
    assert got["warmup"]["status"] == got["verdicts"]["status"] == got["kernel-report"]["status"] == "PASS"
    assert got["kernel-report"]["secs"] == 150  # in the background: it cost the other stages nothing
    assert {"bench_moe_ffn.json", "kernel_report.json", "BENCHMARKS.md"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "bench_moe_ffn.json").read_text()) is not None
    # And when everything before it runs to its cap, the benchmark still keeps its floor.
    caps = {n: c for n, c, _ in plan(res.stdout)[2]}
    env = dict(GPU_CHECK_DRY_RUN_COST=" ".join(f"{n}={caps[n]}" for n in ("env", "build", "warmup", "verdicts")))
    res, out = run(tmp_path, name="worst", **env)
    assert summary(out)["bench-moe_ffn"]["limit"] >= 150


def test_first_gpu_run_costs_reach_the_gpu_test_files(tmp_path):
    """The first GPU run (docs/gpu-check-2026-12-04/summary.md, 550 s): its measured stage costs, every secondary
    benchmark and GPU test file running to its cap. The GPU tests of expert_layer_norm, cuda_ext and
    triton_moe_ffn must still run (they were SKIPped "no time left" then), and the report too."""
    first_run = {"env": 14, "build": 120, "warmup": 25, "kernel-report": 44, "verdicts": 51, "bench-moe_ffn": 45,
                 "sanitize": 25, "report": 2}
    worst = {n: 999 for n in ORDER if n.startswith(("bench-", "gpu-")) and n not in first_run}
    costs = {**first_run, **worst}
    res, out = run(tmp_path, GPU_CHECK_BUDGET_S="550", GPU_CHECK_DRY_RUN_COST=" ".join(f"{k}={v}" for k, v in costs.items()))
    got = summary(out)
    want, elapsed = expected_limits(res.stdout, costs)
    assert all(got[n]["limit"] == want[n] for n in want if want[n] is not None), (got, want)
    for f in FIRST_GPU_FILES:
        assert got[f"gpu-{f}"]["status"] == "TIMEOUT" and got[f"gpu-{f}"]["limit"] >= 60, (f, got[f"gpu-{f}"])
    assert got["report"]["status"] == "PASS" and got["bench-moe_ffn"]["status"] == "PASS"
    assert elapsed <= 550 - plan(res.stdout)[1]


def test_secondary_benchmarks_measure_for_less_time(tmp_path):
    res, _ = run(tmp_path)
    cmds = dict(re.findall(r"^== \[(\S+)\] \(limit \d+s\) (.*)$", res.stdout, re.M))
    assert "--benchmark-max-time=0.25" in cmds["bench-moe_ffn"]
    for b in BENCHES:
        assert "--benchmark-max-time=0.1" in cmds[f"bench-{b}"] and cmds[f"bench-{b}"].startswith(
            "MOEBERT_BENCH_MAX_ROUNDS=20 "), cmds[f"bench-{b}"]
