"""scripts/gpu_check.sh in its dry run: the logic a lent GPU machine would otherwise be first to test.

GPU_CHECK_DRY_RUN=1 replaces every stage's command by a stub (pass, fail, time out or "Device not supported" on
request) and makes time virtual (each stage costs what GPU_CHECK_DRY_RUN_COST says), so a run takes well under
a second and the budget arithmetic is exact. Checked: stage order, the limits, the verdicts, the failing
stage's log tail on stdout, the files left in OUTDIR and the tarball's contents, GPU_CHECK_SKIP, the default
interpreter and CPATH.
"""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
GPU_FILES = ["expert_layer_norm", "distill_loss", "cuda_ext", "triton_moe_ffn"]
BENCHES = ["moe_ffn", "distill_loss", "expert_layer_norm", "end_to_end", "tied", "moe_ffn_gated"]
ORDER = (["env", "build", "verdicts", "sanitize"] + [f"gpu-{f}" for f in GPU_FILES]
         + [f"bench-{b}" for b in BENCHES] + ["report"] + (["demo"] if (ROOT / "carry" / "minilm").is_dir() else [])
         + ["tests"])
RETURNED = {"gpu_check.tar.gz", "summary.md", "BENCHMARKS.md", "moe_ffn_gpu.png"}

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


def expected_limits(stdout, costs=None, timeouts=(), skip=()):
    """Replays the script's budget rule: {stage: limit, or None for a "no time left" SKIP}."""
    budget, reserve, stages = plan(stdout)
    costs = costs or {}
    elapsed, want = 0, {}
    for i, (name, cap, floor) in enumerate(stages):
        if name in skip:
            continue
        left = budget - reserve - elapsed
        limit = min(cap, left - sum(f for n, _, f in stages[i + 1:] if n not in skip))
        if limit < floor:
            limit = min(floor, left)
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
    want = {f"{s}.log" for s in ORDER} | {"setup.log", "summary.md", "verdicts.xml", "tests.xml"}
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
    for f in GPU_FILES + ["gpu_verdicts"]:
        assert f"--ignore=tests/test_{f}.py" in cmds["tests"]


def test_budget_limits_and_verdicts(tmp_path):
    costs = {"build": 200, "verdicts": 139, "gpu-triton_moe_ffn": 56, "bench-end_to_end": 24, "report": 99}
    timeouts = ("sanitize", "bench-moe_ffn")
    env = dict(GPU_CHECK_DRY_RUN_COST=" ".join(f"{k}={v}" for k, v in costs.items()),
               GPU_CHECK_DRY_RUN_TIMEOUT=" ".join(timeouts), GPU_CHECK_DRY_RUN_FAIL="gpu-distill_loss")
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
    assert got["gpu-distill_loss"]["status"] == "FAIL(1)"
    assert got["report"]["status"] == "TIMEOUT"  # it would have run past its limit
    assert got["verdicts"]["status"] == "PASS" and got["verdicts"]["limit"] == want["verdicts"] == 139
    assert all(r["secs"] <= r["limit"] for r in got.values())


def test_squeezed_stage_still_gets_its_floor(tmp_path):
    """Short of time (a 300 s budget), the verdicts keep their floor; the later stages make do with less."""
    res, out = run(tmp_path, GPU_CHECK_BUDGET_S="300", GPU_CHECK_DRY_RUN_COST="build=60")
    budget, reserve, stages = plan(res.stdout)
    later = sum(f for n, _, f in stages[3:])
    assert budget - reserve - 61 - later < 60  # after env (1 s) and build, less than the verdicts' floor is free
    want, _ = expected_limits(res.stdout, {"build": 60})
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
