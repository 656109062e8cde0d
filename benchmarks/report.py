"""Turn pytest-benchmark JSON into markdown tables (and a PNG plot) for BENCHMARKS.md.

Usage:
    python benchmarks/report.py RESULTS.json [MORE.json ...] [--out BENCHMARKS.md] [--section NAME]
        [--plot benchmarks/moe_ffn_cpu.png] [--stat median|min] [--command "how the JSON was made"]

- One table per (MoE-FFN mode, E, dtype): every alternative at every T, with TFLOP/s, the fraction
  of a measured dense GEMM pair of equal FLOPs, and speed-ups against the dense 3072 FFN and the
  MoEBERT-style loop. End-to-end groups get speed-ups against the dense model; any other group
  (e.g. the distillation loss) gets a generic table against its ``eager`` row.
- A targets table checks the numbers against the issues' targets (met / not met / not measured).
- GPU: a table of the cuda and triton backends' fraction of cuBLAS dense GEMMs of equal FLOPs at BERT-base
  shape (bf16, E=4, T in 1k/4k/16k/64k), forward and forward + backward.
- The header states device, torch, triton and CUDA versions, the date and the command, all taken
  from the JSON (so it describes the machine that ran the benchmarks, not the one running this).
- ``--out`` replaces (or appends) the section between ``<!-- bench:NAME:start/end -->`` markers
  and leaves the rest of the file alone, so CPU and GPU sections live side by side.
- matplotlib is optional: without it the plot is skipped and the report says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

# dense: BERT's d -> 3072 -> d FFN; dense_equal: a dense FFN of the routed layer's FLOPs (h = 768), cuBLAS's rate.
IMPL_ORDER = ["dense", "dense_equal", "loop", "padded_bmm", "grouped_mm", "torch", "triton", "cuda"]
KERNEL_IMPLS = ("triton", "cuda")


@dataclass
class Row:
    group: str
    name: str
    impl: str
    kind: str
    stats: dict
    info: dict = field(default_factory=dict)

    def t(self, stat: str) -> float:
        return float(self.stats[stat])

    def get(self, key, default=None):
        return self.info.get(key, default)


# ---- loading ------------------------------------------------------------------------------

def load(paths: list[str]) -> tuple[list[Row], dict]:
    """Rows from every file, and the environment of the first file that has one."""
    rows, env = [], {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not env:
            env = _environment(data)
        for b in data.get("benchmarks", []):
            info = dict(b.get("extra_info") or {})
            impl = str(info.get("impl") or _param_impl(b))
            kind = str(info.get("kind") or (b.get("group") or "other").split(" ")[0])
            rows.append(Row(b.get("group") or b["name"], b["name"], impl, kind, b["stats"], info))
    return rows, env


def _param_impl(b: dict) -> str:
    params = b.get("params") or {}
    for key in ("impl", "backend", "variant", "model", "student"):
        if key in params:
            return str(params[key])
    return b.get("param") or b["name"]


def _environment(data: dict) -> dict:
    mi = data.get("machine_info") or {}
    mb = mi.get("moebert") or {}
    device_type = mb.get("device_type", "cpu")
    if device_type == "cuda":
        device = f"{mb.get('gpu', 'GPU')} (sm_{mb.get('gpu_sm', '?').replace('.', '')}, " \
                 f"{mb.get('gpu_memory_gib', '?')} GiB)"
    else:
        cpu = mb.get("cpu_model") or (mi.get("cpu") or {}).get("brand_raw") or "CPU"
        n = mb.get("torch_threads", "?")
        device = f"{cpu}, {n} torch thread{'' if n == 1 else 's'}"
    return {
        "device_type": device_type,
        "device": device,
        "torch": mb.get("torch", "?"),
        "triton": mb.get("triton", "?"),
        "cuda": mb.get("cuda", "?"),
        "python": mi.get("python_version", "?"),
        "date": (data.get("datetime") or "?")[:19].replace("T", " "),
        "command": mb.get("command", "?"),
        "full_matrix": mb.get("full_matrix", False),
        "cpu_count": mb.get("cpu_count"),
        "load": (mb.get("loadavg_start"), mb.get("loadavg_end")),
        "malloc": mb.get("malloc"),
    }


# ---- numbers ------------------------------------------------------------------------------

def speedup(base: Optional[Row], row: Row, stat: str) -> Optional[float]:
    """How many times faster ``row`` is than ``base`` (base time / row time)."""
    if base is None or row.t(stat) <= 0:
        return None
    return base.t(stat) / row.t(stat)


def moe_tables(rows: list[Row], stat: str) -> dict[tuple, list[dict]]:
    """{(mode, E, dtype): [per-row dicts sorted by T then impl]} for the MoE-FFN rows."""
    out: dict[tuple, list[dict]] = {}
    by_group: dict[str, list[Row]] = {}
    for r in rows:
        if r.kind == "moe_ffn":
            by_group.setdefault(r.group, []).append(r)
    for group_rows in by_group.values():
        base = {r.impl: r for r in group_rows}
        for r in group_rows:
            key = (r.get("mode", "?"), r.get("E", "?"), r.get("dtype", "?"))
            out.setdefault(key, []).append({
                "T": r.get("T"), "impl": r.impl, "time": r.t(stat), "min": r.t("min"), "median": r.t("median"),
                "tflops": r.get("tflops"), "frac_gemm_pair": r.get("frac_gemm_pair"),
                "x_weight_floor": r.get("x_weight_floor"),
                "vs_dense": speedup(base.get("dense"), r, stat), "vs_loop": speedup(base.get("loop"), r, stat),
            })
    for v in out.values():
        v.sort(key=lambda d: (d["T"] or 0, _impl_rank(d["impl"])))
    return dict(sorted(out.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))))


CUBLAS_TOKENS = (1024, 4096, 16384, 65536)


def cublas_fractions(rows: list[Row]) -> dict[int, dict[tuple, float]]:
    """{T: {(impl, mode): frac_gemm_pair}} for the kernel backends' GPU moe_ffn rows at BERT-base shape
    (bf16, E=4, d=h=768): the fraction of a cuBLAS dense GEMM of equal FLOPs (median-based)."""
    out: dict[int, dict[tuple, float]] = {}
    for r in rows:
        if (r.kind == "moe_ffn" and r.impl in KERNEL_IMPLS and r.get("device_type") == "cuda"
                and r.get("dtype") == "bfloat16" and r.get("E") == 4 and r.get("T") in CUBLAS_TOKENS
                and r.get("d", 768) == 768 and r.get("h", 768) == 768 and r.get("frac_gemm_pair") is not None):
            out.setdefault(r.get("T"), {})[(r.impl, r.get("mode"))] = float(r.get("frac_gemm_pair"))
    return dict(sorted(out.items()))


def _cublas_table(rows: list[Row]) -> list[str]:
    fr = cublas_fractions(rows)
    if not fr:
        return []
    cols = [(impl, mode) for impl in KERNEL_IMPLS for mode in ("fwd", "fwd+bwd")]
    lines = ["### MoE-FFN kernels as a fraction of cuBLAS (bf16, E=4, d=h=768)", "",
             "Each backend's TFLOP/s over that of cuBLAS dense GEMMs of equal FLOPs on the same GPU: the forward "
             "GEMM pair (`[T,768]x[768,768]` twice) for `fwd`, the pair and its four backward GEMMs for "
             "`fwd+bwd` (median times). 1.00 would be routed experts at the dense rate.", "",
             "| T |" + "".join(f" {i} {m} |" for i, m in cols), "|---:|" + "---:|" * len(cols)]
    for T, vals in fr.items():
        lines.append(f"| {T} |" + "".join(f" {_num(vals.get(c))} |" for c in cols))
    return lines + [""]


def _impl_rank(impl: str) -> int:
    """Table order: IMPL_ORDER, each eager row before its CUDA-graph row (``<impl>+graph``)."""
    base, graph = impl.removesuffix("+graph"), impl.endswith("+graph")
    return 2 * (IMPL_ORDER.index(base) if base in IMPL_ORDER else len(IMPL_ORDER)) + graph


def _find(rows, kind, impl, stat, **match) -> Optional[Row]:
    for r in rows:
        if r.kind == kind and r.impl == impl and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def targets(rows: list[Row], stat: str) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for every target from the issues this data can check."""
    res = []

    def verdict(ok: Optional[bool]) -> str:
        return "not measured" if ok is None else ("met" if ok else "NOT met")

    cpu = [r for r in rows if r.get("device_type") == "cpu"]
    gpu = [r for r in rows if r.get("device_type") == "cuda"]
    if cpu:
        # Issue 6: CPU, 2 threads, fp32, T=128, MoE-FFN >= 3.8x the dense FFN.
        m = dict(kind="moe_ffn", stat=stat, mode="fwd", T=128, E=4, dtype="float32")
        dense = _find(cpu, impl="dense", **m)
        for impl in ("torch", "loop", "padded_bmm", "grouped_mm"):
            r = _find(cpu, impl=impl, **m)
            s = speedup(dense, r, stat) if r else None
            res.append((f"CPU fp32 T=128 E=4 MoE-FFN fwd `{impl}` >= 3.8x dense FFN",
                        "-" if s is None else f"{s:.2f}x", verdict(None if s is None else s >= 3.8)))
        dense = _find(cpu, "e2e_infer", "dense", stat, B=1)
        moe = _find(cpu, "e2e_infer", "moe", stat, B=1)
        s = speedup(dense, moe, stat) if moe else None
        res.append(("CPU end to end BERT-base 1x128 inference >= 2.2x",
                    "-" if s is None else f"{s:.2f}x", verdict(None if s is None else s >= 2.2)))
    if gpu:
        for impl in KERNEL_IMPLS:
            res.extend(_gpu_targets(gpu, impl, stat, verdict))
    return res


def _gpu_targets(gpu: list[Row], impl: str, stat: str, verdict) -> list[tuple[str, str, str]]:
    """Issue 3's targets (bf16, E=4) for one kernel backend; worst case over T."""
    out = []
    fwd = [r for r in gpu if r.kind == "moe_ffn" and r.impl == impl and r.get("mode") == "fwd" and r.get("E") == 4]
    both = [r for r in gpu if r.kind == "moe_ffn" and r.impl == impl and r.get("mode") == "fwd+bwd"
            and r.get("E") == 4]

    def worst(rs, other, pred=lambda r: True, mode="fwd"):
        vals = []
        for r in rs:
            if not pred(r):
                continue
            base = _find(gpu, "moe_ffn", other, stat, mode=mode, T=r.get("T"), E=4, dtype=r.get("dtype"))
            s = speedup(base, r, stat)
            if s is not None:
                vals.append((s, r.get("T")))
        return min(vals) if vals else None

    def line(text, val, thresh, fmt="{:.2f}x at T={}"):
        out.append((f"GPU `{impl}` {text}", "-" if val is None else fmt.format(*val),
                    verdict(None if val is None else val[0] >= thresh)))

    fr = [(r.get("frac_gemm_pair"), r.get("T")) for r in fwd if r.get("frac_gemm_pair") is not None]
    line("fwd >= 0.85x dense GEMM-pair rate (all T)", min(fr) if fr else None, 0.85, "{:.2f} at T={}")
    line("fwd >= 3.6x dense FFN at T >= 4k", worst(fwd, "dense", lambda r: (r.get("T") or 0) >= 4096), 3.6)
    fl = [(r.get("x_weight_floor"), r.get("T")) for r in fwd
          if r.get("x_weight_floor") is not None and (r.get("T") or 0) <= 1024]
    v = max(fl) if fl else None
    out.append((f"GPU `{impl}` fwd at T <= 1k <= 2x weight-read floor (+1 launch)",
                "-" if v is None else f"{v[0]:.2f}x floor at T={v[1]}", verdict(None if v is None else v[0] <= 2.0)))
    line("fwd >= 10x loop dispatch (all T)", worst(fwd, "loop"), 10.0)
    line("fwd faster than grouped_mm (all T)", worst(fwd, "grouped_mm"), 1.0)
    line("fwd+bwd >= 3x dense FFN (all T)", worst(both, "dense", mode="fwd+bwd"), 3.0)
    return out


# ---- markdown -----------------------------------------------------------------------------

def fmt_time(s: Optional[float]) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _num(v, pattern="{:.2f}") -> str:
    return "-" if v is None else pattern.format(v)


def _load_line(env: dict) -> list[str]:
    start, end = env.get("load") or (None, None)
    if env.get("device_type") == "cuda" or not start:
        return []
    fmt = lambda v: "/".join(f"{x:g}" for x in v)  # noqa: E731
    return [f"- Host load average (1/5/15 min) at start {fmt(start)}, at end {fmt(end or [])} "
            f"on {env.get('cpu_count') or '?'} CPUs: other work on a shared machine inflates CPU times"]


def render(rows: list[Row], env: dict, stat: str, title: str, command: Optional[str] = None,
           plot_note: Optional[str] = None) -> str:
    lines = [f"## {title}", ""]
    lines += [
        f"- Device: {env.get('device', '?')}",
        f"- torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, CUDA {env.get('cuda', '?')}, "
        f"Python {env.get('python', '?')}",
        f"- Date: {env.get('date', '?')} (UTC)",
        f"- Command: `{command or env.get('command', '?')}`",
        *_load_line(env),
        *([f"- Host allocator: {env['malloc']}"] if env.get("malloc") and env.get("device_type") != "cuda" else []),
        f"- Times are the {stat} over rounds; speed-ups are time ratios of that {stat} "
        f"(`x dense` = dense time / this time). Only measured numbers appear here.",
        "",
    ]
    tg = targets(rows, stat)
    if tg:
        lines += ["### Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in tg]
        lines.append("")
    lines += _cublas_table(rows)
    other = "median" if stat == "min" else "min"
    tables = moe_tables(rows, stat)
    if tables:
        lines += ["### MoE-FFN layer (d=768, h=768; dense = BERT's 768-3072-768 FFN)", ""]
        for (mode, E, dtype), items in tables.items():
            gpu = any(d["x_weight_floor"] is not None for d in items)
            lines += [f"**{mode}, E={E}, {dtype}**", ""]
            head = f"| T | impl | {stat} | {other} | TFLOP/s | x GEMM-pair rate | x dense | x loop |"
            sep = "|---:|---|---:|---:|---:|---:|---:|---:|"
            if gpu:
                head += " x weight floor |"
                sep += "---:|"
            lines += [head, sep]
            for d in items:
                line = (f"| {d['T']} | {d['impl']} | {fmt_time(d['time'])} | {fmt_time(d[other])} | "
                        f"{_num(d['tflops'], '{:.3f}')} | {_num(d['frac_gemm_pair'])} | {_x(d['vs_dense'])} | "
                        f"{_x(d['vs_loop'])} |")
                if gpu:
                    line += f" {_num(d['x_weight_floor'])} |"
                lines.append(line)
            lines.append("")
    lines += _e2e_tables(rows, stat)
    lines += _other_tables(rows, stat)
    if plot_note:
        lines += [plot_note, ""]
    return "\n".join(lines).rstrip() + "\n"


def _groups(rows: list[Row], pred) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        if pred(r):
            out.setdefault(r.group, []).append(r)
    return out


def _e2e_tables(rows: list[Row], stat: str) -> list[str]:
    other = "median" if stat == "min" else "min"
    groups = _groups(rows, lambda r: r.kind.startswith("e2e"))
    if not groups:
        return []
    lines = ["### End to end: BERT-base (random init), dense vs MoEBERT-patched (E=4, expert 768, shared 512)", "",
             f"| group | model | MoE backend | {stat} | {other} | TFLOP/s | x dense |",
             "|---|---|---|---:|---:|---:|---:|"]
    for g, rs in sorted(groups.items()):
        base = next((r for r in rs if r.impl == "dense"), None)
        for r in sorted(rs, key=lambda r: r.impl):
            lines.append(f"| {g} | {r.impl} | {r.get('moe_backend', '-')} | {fmt_time(r.t(stat))} | "
                         f"{fmt_time(r.t(other))} | {_num(r.get('tflops'), '{:.3f}')} | {_x(speedup(base, r, stat))} |")
    loss = sorted({str(r.get("loss")) for r in rows if r.kind == "e2e_train" and r.get("loss")})
    if loss:
        lines.append(f"\nTraining step loss: {', '.join(loss)}.")
    return lines + [""]


def _other_tables(rows: list[Row], stat: str) -> list[str]:
    other = "median" if stat == "min" else "min"
    groups = _groups(rows, lambda r: r.kind != "moe_ffn" and not r.kind.startswith("e2e"))
    lines = []
    skip = {"impl", "kind", "device", "device_type", "timer", "dtype", "threads"}
    for g, rs in sorted(groups.items()):
        base = next((r for r in rs if r.get("baseline")), None) or \
            next((r for r in rs if "eager" in r.impl or "eager" in r.name), None)
        # numeric extra_info that differs between the rows (peak memory, ...); constants are in the title
        extra = sorted({k for r in rs for k, v in r.info.items() if k not in skip and isinstance(v, (int, float))
                        and not isinstance(v, bool) and len({str(x.get(k)) for x in rs}) > 1})
        lines += [f"### {g}", ""]
        head = f"| impl | {stat} | {other} | rounds |" + "".join(f" {k} |" for k in extra)
        head += f" x {base.impl} |" if base else ""
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rs:
            line = f"| {r.impl} | {fmt_time(r.t(stat))} | {fmt_time(r.t(other))} | {r.stats.get('rounds', '-')} |"
            line += "".join(f" {_num(r.get(k), '{:g}')} |" for k in extra)
            line += f" {_x(speedup(base, r, stat))} |" if base else ""
            lines.append(line)
        lines.append("")
    return lines


# ---- plot ---------------------------------------------------------------------------------

def plot(rows: list[Row], stat: str, path: str, title: str) -> Optional[str]:
    """Speed-up over the dense FFN against T, one panel per (mode, E). Returns a reason if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    tables = moe_tables(rows, stat)
    if not tables:
        return "no MoE-FFN rows to plot"
    keys = list(tables)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        impls = sorted({d["impl"] for d in tables[key]}, key=_impl_rank)
        for impl in impls:
            pts = [(d["T"], d["vs_dense"]) for d in tables[key] if d["impl"] == impl and d["vs_dense"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{key[0]}, E={key[1]}, {key[2]}")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("speed-up vs dense 3072 FFN")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---- BENCHMARKS.md sections ---------------------------------------------------------------

FILE_HEADER = """# Benchmarks

Measured with `pytest benchmarks/` (pytest-benchmark) and written by `benchmarks/report.py`.
Each section states its device, versions, date and command. Numbers are measurements only;
targets live in the issues and in the targets table of each section.
"""


def write_section(path: str, name: str, body: str) -> None:
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = open(path).read() if os.path.exists(path) else FILE_HEADER
    if start in text and end in text:
        i, j = text.index(start), text.index(end) + len(end)
        text = text[:i] + block.rstrip("\n") + text[j:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    ap.add_argument("--out", help="markdown file to write the section into (default: print)")
    ap.add_argument("--section", help="section name for --out (default: cpu or gpu)")
    ap.add_argument("--plot", help="PNG path for the MoE-FFN speed-up plot")
    ap.add_argument("--stat", choices=("median", "min"), default="median")
    ap.add_argument("--command", help="command line to state (default: the one recorded in the JSON)")
    ap.add_argument("--title", help="section title")
    args = ap.parse_args(argv)

    paths = [p for p in args.json if os.path.exists(p)]
    missing = [p for p in args.json if not os.path.exists(p)]
    for p in missing:
        print(f"report: {p} does not exist (its benchmarks did not finish?); skipping it", file=sys.stderr)
    if not paths:
        print("report: no benchmark JSON to report", file=sys.stderr)
        return 1
    rows, env = load(paths)
    title = args.title or f"{'GPU' if env.get('device_type') == 'cuda' else 'CPU'}: {env.get('device', '?')}"
    note = None
    if args.plot:
        why = plot(rows, args.stat, args.plot, title)
        if why:
            note = f"Plot skipped: {why}."
            print(f"report: {note}", file=sys.stderr)
        else:
            rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.out)) if args.out else ".")
            note = f"![MoE-FFN speed-up over the dense FFN]({rel})"
    body = render(rows, env, args.stat, title, args.command, note)
    if args.out:
        write_section(args.out, args.section or env.get("device_type", "cpu"), body)
        print(f"report: wrote section to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
