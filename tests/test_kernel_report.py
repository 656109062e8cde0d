"""scripts/kernel_report.py in CI: every Triton kernel the launchers can pick, compiled for sm_90a and sm_80 with
no GPU, must pass ``violations()``: no spill in a GEMM, HGMMA in every 16-bit sm_90 GEMM, shared memory within
the arch's limit.

The report runs once (bf16, the dtype the GPU benchmarks run; fp16 compiles to the same tiles and fp32 has no
HGMMA rule: ``python scripts/kernel_report.py`` covers all three). Today's kernels break the rules in the
places listed in KNOWN_VIOLATIONS (measured with triton 3.9, CI's version): each is a strict xfail, so a kernel
change that fixes one turns it into a failure that says to remove its entry. The checker itself is shown to
reject a spilling GEMM, both as a report row and as a real CUDA kernel built with nvcc.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _aot  # noqa: E402
import kernel_report as kr  # noqa: E402

_THIN = ("BLOCK_M < 64: Triton emits mma.sync (HMMA) for thin tiles, since a Hopper wgmma needs 64 rows per "
         "warpgroup; give these token buckets 64-row tiles or make the rule exempt them")
# Regenerate after a kernel change: python scripts/kernel_report.py --dtypes bf16 --no-cuda --known
# row_id -> why it is known to fail (triton 3.9, 2026-12-04, `python scripts/kernel_report.py --dtypes bf16`).
KNOWN_VIOLATIONS = {
    "triton|moe_ffn_bwd_hidden|sm_90a|bfloat16|M16 N64 K128 w4 s4": _THIN,
    "triton|moe_ffn_bwd_hidden|sm_90a|bfloat16|M32 N64 K128 w4 s4": _THIN,
    "triton|moe_ffn_down|sm_90a|bfloat16|M16 N64 K128 w4 s4": _THIN,
    "triton|moe_ffn_down|sm_90a|bfloat16|M32 N64 K128 w4 s4": _THIN,
    "triton|moe_ffn_up|sm_80|bfloat16|M128 N128 K64 w8 s4": "gated (GeGLU) up spills 40 B",
    "triton|moe_ffn_up|sm_80|bfloat16|M64 N128 K64 w4 s4": "gated (GeGLU) up spills 8 B",
    "triton|moe_ffn_up|sm_90a|bfloat16|M128 N128 K64 w8 s4": "gated (GeGLU) up spills 32 B",
    "triton|moe_ffn_up|sm_90a|bfloat16|M64 N128 K64 w4 s4": "gated (GeGLU) up spills 40 B",
    "triton|moe_ffn_up|sm_90a|bfloat16|M16 N64 K128 w4 s4": _THIN,
    "triton|moe_ffn_up|sm_90a|bfloat16|M32 N64 K128 w4 s4": _THIN,
}

needs_ptxas = pytest.mark.skipif(not _aot.have_ptxas(), reason="triton's NVIDIA backend (ptxas) is not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if os.environ.get("MOEBERT_KERNEL_REPORT_JSON"):  # a report made already (kernel_report.py --dtypes bf16 --json)
        return json.loads(Path(os.environ["MOEBERT_KERNEL_REPORT_JSON"]).read_text())
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--dtypes", "bf16", "--no-cuda",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=3000, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def _launched_kernels():
    """Every ``*_kernel`` JITFunction of the launcher modules: each must appear in the report."""
    names = set()
    for f in (ROOT / "moebert_kernels" / "triton").glob("*.py"):
        for line in f.read_text().splitlines():
            if line.startswith("def _") and "_kernel(" in line:
                names.add(line[len("def _"):line.index("_kernel(")])
    return names


@needs_ptxas
@pytest.mark.slow
def test_report_covers_every_kernel_on_both_archs(report):
    assert set(kr.FIELDS) <= set(report[0])
    for arch in kr.ARCHS:
        got = {r["kernel"] for r in report if r["arch"] == arch}
        assert _launched_kernels() <= got, (arch, _launched_kernels() - got)
    # It reads real SASS: the largest bf16 up-projection tile runs on Hopper wgmma and pipelines with cp.async.
    up = [r for r in report if r["kernel"] == "moe_ffn_up" and r["arch"] == "sm_90a" and r["config"].startswith("M128")]
    assert up and all(r["hgmma"] > 0 and r["cp_async"] > 0 and r["gemm"] for r in up), up
    assert all(r["ctas_per_sm"] >= 1 and r["registers"] > 0 for r in report)
    assert not any(r["gemm"] for r in report if r["kernel"].startswith(("distill", "eln", "moe_ffn_dw_reduce")))


@needs_ptxas
@pytest.mark.slow
def test_no_violations_beyond_the_known_ones(report):
    new = [(k, w) for k, w in kr.violations(report) if k not in KNOWN_VIOLATIONS]
    assert not new, "kernel report violations:\n" + "\n".join(f"{k}: {w}" for k, w in new)


@needs_ptxas
@pytest.mark.slow
@pytest.mark.parametrize("key", [
    pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=f"known: {why}. If this XPASSes, the kernel was "
                                             "fixed (or the config is gone): remove its entry from KNOWN_VIOLATIONS "
                                             "in tests/test_kernel_report.py"))
    for k, why in KNOWN_VIOLATIONS.items()])
def test_known_violation(report, key):
    assert not [w for k, w in kr.violations(report) if k == key]


def _row(**kw):
    row = dict(kernel="moe_ffn_up", backend="triton", arch="sm_90a", dtype="bfloat16", config="M128 N128 K64 w8 s4",
               variant="", registers=168, spill_bytes=0, smem_bytes=131072, ctas_per_sm=1, hgmma=8, hmma=0,
               tma_loads=0, cp_async=64, local_loads=0, local_stores=0, threads=256, gemm=True, shapes=[])
    row.update(kw)
    return row


def test_checker_rejects_what_it_must():
    assert kr.violations([_row()]) == []
    (key, what), = kr.violations([_row(spill_bytes=624, local_loads=190, local_stores=160)])
    assert key == "triton|moe_ffn_up|sm_90a|bfloat16|M128 N128 K64 w8 s4" and "spills 624 B" in what
    assert "without HGMMA" in kr.violations([_row(hgmma=0, hmma=16)])[0][1]
    assert kr.violations([_row(hgmma=0, hmma=16, arch="sm_80")]) == []  # no wgmma on Ampere
    assert kr.violations([_row(hgmma=0, dtype="float32")]) == []  # IEEE fp32 runs on FMA units by design
    assert "shared memory 232449 B" in kr.violations([_row(smem_bytes=232449)])[0][1]
    assert "over the sm_80 limit" in kr.violations([_row(arch="sm_80", hgmma=0, smem_bytes=166913)])[0][1]
    # Not a GEMM: a spill is reported but allowed; the shared-memory limit still applies.
    assert kr.violations([_row(gemm=False, hgmma=0, spill_bytes=64)]) == []
    assert kr.violations([_row(gemm=False, smem_bytes=10 ** 6)]) != []
    assert "not even one CTA" in kr.violations([_row(ctas_per_sm=0)])[0][1]


def test_ctas_per_sm_follows_the_limits():
    assert kr.ctas_per_sm(90, 255, 114688, 256) == 1  # 255 regs x 256 threads: half the register file
    assert kr.ctas_per_sm(90, 64, 61440, 128) == 3  # shared memory: 3 x (60 KiB + 1 KiB) of 228 KiB
    assert kr.ctas_per_sm(80, 32, 0, 1024) == 2  # threads: 2048 per SM
    assert kr.ctas_per_sm(90, 16, 0, 32) == 32  # the hardware cap
    assert kr.ctas_per_sm(80, 32, 166913, 128) == 0  # over the per-block limit


def test_parsers_read_cuobjdump_output():
    usage = """
Fatbin elf code:
================
arch = sm_90a

Resource usage:
 Common:
  GLOBAL:0
 Function _Z9gemm_tileILi128EEvPf:
  REG:168 STACK:16 SHARED:2048 LOCAL:8 CONSTANT[0]:536 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert kr.parse_resource_usage(usage) == {("sm_90a", "_Z9gemm_tileILi128EEvPf"):
                                              {"REG": 168, "STACK": 16, "SHARED": 2048, "LOCAL": 8}}
    sass = """
arch = sm_90a
        Function : _Z9gemm_tileILi128EEvPf
        /*0000*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24 ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0040*/                   STL [R1], R2 ;
"""
    assert kr.parse_sass(sass)[("sm_90a", "_Z9gemm_tileILi128EEvPf")] == dict(
        hgmma=2, hmma=0, tma_loads=1, cp_async=1, local_loads=0, local_stores=1)
    assert kr.short_name("void cutlass::device_kernel<Gemm<128>>(Gemm<128>::Params)") == "device_kernel"
    assert kr.short_name("void moebert::(anonymous namespace)::_grouped_gemm_kernel<__nv_bfloat16>("
                         "moebert::(anonymous namespace)::GemmArgs)") == "_grouped_gemm_kernel"


def test_a_kernel_is_a_gemm_by_its_own_name_not_its_template_arguments():
    """The H200 run (2026-12-04) flagged the device-side argument builder as "sm_90 GEMM without HGMMA"."""
    args_builder = ("void moebert::(anonymous namespace)::_sm90_args_kernel<moebert::(anonymous namespace)::Sm90Gemm<"
                    "cutlass::bfloat16_t, cutlass::gemm::GemmShape<128, 128, 64>>>(moebert::GroupArgs, int)")
    assert not kr.named_gemm(args_builder)
    assert kr.named_gemm("void moebert::(anonymous namespace)::_grouped_gemm_kernel<__nv_bfloat16>(GemmArgs)")
    assert kr.named_gemm("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int>, "
                         "CollectiveMma<Sm90>, Epilogue, void>>(GemmUniversal<...>::Params)")
    assert kr.named_gemm("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_128x128_32x3_tn_align8>("
                         "cutlass_80_tensorop_bf16_s16816gemm_128x128_32x3_tn_align8::Params)")
    assert not kr.named_gemm("void cutlass::device_kernel<cutlass::reduction::kernel::ReduceSplitK<Gemm<1>>>(P)")
    assert not kr.named_gemm("void moebert::(anonymous namespace)::_plan_kernel(long const*, long, int)")
    # and so the report's rule: an HGMMA-less 16-bit sm_90 kernel is a violation only when it is a GEMM
    row = dict(kernel="_sm90_args_kernel", backend="cuda", arch="sm_90a", dtype="", config="c",
               variant=args_builder, registers=24, spill_bytes=0, smem_bytes=1024, ctas_per_sm=None, threads=None,
               gemm=kr.named_gemm(args_builder), shapes=[], hgmma=0, hmma=0, tma_loads=0, cp_async=0,
               local_loads=0, local_stores=0)
    assert kr.violations([row]) == []


_SPILLING_CU = r"""
// A "GEMM" that keeps 64 live accumulators under a 32-register cap: ptxas must spill them to the stack.
__global__ void spilling_gemm(const float* __restrict__ a, float* __restrict__ out, int n) {
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = a[threadIdx.x + i * n];
  for (int k = 0; k < n; ++k)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = acc[i] * a[k] + acc[(i + 7) % 64];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s += acc[i] * (i + 1);
  out[threadIdx.x] = s;
}
__global__ void clean_copy(const float* a, float* out) { out[threadIdx.x] = a[threadIdx.x]; }
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_so_with_a_spilling_gemm_is_rejected(tmp_path):
    """The --cuda-so path end to end on a real fatbin: a spilling GEMM kernel fails the check, per arch."""
    (tmp_path / "k.cu").write_text(_SPILLING_CU)
    so = tmp_path / "_C_test.so"
    subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", "-maxrregcount=32", "-o", str(so), str(tmp_path / "k.cu"),
                    "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"],
                   check=True, capture_output=True, timeout=300)
    rows = kr.cuda_rows(str(so), list(kr.ARCHS))
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in ("spilling_gemm", "clean_copy")
                                                        for a in kr.ARCHS}
    bad = kr.violations(rows)
    assert {k.split("|")[2] for k, w in bad if "|spilling_gemm|" in k and "spills" in w} == set(kr.ARCHS)
    assert not [k for k, _ in bad if "|clean_copy|" in k]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--no-triton", "--cuda-so",
                          str(so), "--check", "--json", str(tmp_path / "r.json")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1 and "VIOLATION cuda|spilling_gemm|sm_90a" in res.stdout, res.stdout + res.stderr
    assert len(json.loads((tmp_path / "r.json").read_text())) == 4
    for rules, rc in (("spill", 1), ("smem,fit", 0)):  # what scripts/ci_cuda_build.sh enforces: --check spill
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--no-triton", "--cuda-so",
                              str(so), "--check", rules], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == rc, (rules, res.stdout[-2000:], res.stderr[-2000:])


def test_tuned_configs_are_read_from_json_and_launched(tmp_path):
    """Configs as data (moebert_kernels/triton/configs/*.json): each tuned tile reaches the launchers at its file's
    shape and dtype, so the report compiles it. Any nesting works: a config is an object with block sizes, its
    kind the key above it that names one."""
    tile = {"block_m": 128, "block_n": 256, "block_k": 32, "num_warps": 8, "num_stages": 3}
    dw_tile = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    fp32_tile = {"block_m": 32, "block_n": 32, "block_k": 16, "num_warps": 2, "num_stages": 2}
    (tmp_path / "moe_ffn,d=768,h=3072,E=4,device_name=NVIDIA_H200.json").write_text(json.dumps(
        {"meta": {"device_name": "NVIDIA_H200"}, "configs": {
            "gemm": {"bfloat16": {"4096": tile}, "float32": {"4096": fp32_tile}},
            "dw": {"bfloat16": {"4096": dw_tile}}}}))
    found = kr.tuned_configs(tmp_path)
    assert sorted((t.kind, t.bucket, t.dtype, t.shape) for t in found) == [
        ("dw", 4096, "bfloat16", (768, 3072, 4)), ("gemm", 4096, "bfloat16", (768, 3072, 4)),
        ("gemm", 4096, "float32", (768, 3072, 4))]
    # Recording needs real JIT kernels: a process without TRITON_INTERPRET (conftest sets it on CPU).
    script = ("import sys, json; sys.path.insert(0, 'scripts'); import kernel_report as kr\n"
              f"ls = kr.record_launches(['bf16'], buckets=[16], shapes=[(768, 768, 4)], config_dir={str(tmp_path)!r})\n"
              "print(json.dumps(sorted({(ln.name, kr._config_and_variant(ln)[0], ln.shape) for ln in ls})))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    launched = {tuple(c) for c in json.loads(res.stdout.splitlines()[-1])}
    configs = {(name, cfg) for name, cfg, _ in launched}
    assert ("_moe_ffn_up_kernel", "M128 N256 K32 w8 s3", "T=4096,d=768,h=3072,E=4") in launched
    assert ("_moe_ffn_dw_kernel", "M64 N128 K32 w4 s2") in configs
    assert ("_moe_ffn_up_kernel", "M16 N64 K128 w4 s4") in configs  # the heuristic's own tile for T=16
    assert not [c for c in configs if c[1].startswith("M32 N32 K16")]  # the fp32 entry is not a bf16 launch
    assert kr.tuned_configs(tmp_path / "none") == []
