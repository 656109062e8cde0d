#!/usr/bin/env bash
# One command for a lent GPU machine (no registry access): what the first GPU run must decide, speed numbers first.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Made to fit one 600 s remote command that returns at most 8 files. OUTDIR ends up holding only:
#   gpu_check.tar.gz     every stage log, junit XML and benchmark JSON (plus setup.log and summary.md)
#   summary.md           one row per stage: status, seconds, limit, one-line note
#   bench_moe_ffn.json   the moe_ffn benchmark (pytest-benchmark JSON; benchmarks/report.py reads it)
#   kernel_report.json   scripts/kernel_report.py on this machine: Triton (its triton) and the built _C
#   BENCHMARKS.md        the report's GPU section          moe_ffn_gpu.png   its plot
# The tarball and summary are rewritten after every stage, so a run cut off from outside keeps what it had.
# Stdout: the plan, one header and one verdict line per stage, the last 40 lines of the log of any stage that
# failed or timed out, and the summary.
#
# Stages, in this order (each its own process; a failed stage never stops the next one). No CPU test stage:
# CI runs the suite on CPU.
#   env                      versions, nvidia-smi, nvcc, compute-sanitizer
#   build                    pip install --no-build-isolation --no-deps -e . (MOEBERT_BUILD_CUDA=1,
#                            TORCH_CUDA_ARCH_LIST="8.0;9.0a"), then checks that moebert_kernels._C loads; reuses a
#                            build whose csrc/ and setup.py are unchanged (a second run on a warm machine)
#   warmup                   scripts/kernel_report.py --warmup --dtypes bf16: every bf16 Triton kernel the launchers
#                            can pick (what the verdicts and benchmarks run), compiled
#                            for this GPU by a pool of processes into Triton's cache, so no later stage compiles
#                            serially
#   kernel-report            (in the background, niced, from here to the end) scripts/kernel_report.py --dtypes
#                            bf16 on the built _C -> OUTDIR/kernel_report.json; it needs CPUs only
#   verdicts                 tests/test_gpu_verdicts.py: every backend at BERT sizes, bf16 vs the fp32 reference
#   bench-moe_ffn            forward + backward, then forward, T 1k/4k/16k, E=4, bf16: dense of equal FLOPs,
#                            grouped_mm, loop, triton, cuda, eager and CUDA graph -> OUTDIR/bench_moe_ffn.json
#   sanitize                 compute-sanitizer memcheck on scripts/sanitize_case.py --backends cuda (the CUDA C++
#                            path); "Device not supported" is a SKIP with that reason
#   gpu-<file>               the GPU tests of expert_layer_norm, cuda_ext and triton_moe_ffn (before the benchmarks),
#                            one pytest process per file (an illegal address is sticky: it must not fail the files
#                            after it); CUDA_LAUNCH_BLOCKING=1 for the CUDA C++ tests, so a fault is reported at
#                            the launch that made it
#   bench-<file>             the other benchmarks, measured for less time: end-to-end BERT-base first
#   report                   benchmarks/report.py -> OUTDIR/BENCHMARKS.md and OUTDIR/moe_ffn_gpu.png
#   gpu-<file>               the rest of the GPU test files, on what is left
#   demo                     moebert demo --device cuda, only if carry/minilm exists (scripts/pack_demo_model.py)
# Exit 0 only if every stage passed or was skipped on request or for an unsupported device.
#
# Budget: GPU_CHECK_BUDGET_S (default 540 s). Each stage has a cap and a floor. With left = BUDGET - RESERVE -
# elapsed, a stage's limit is min(cap, left - the floors of the stages after it): a stage that hangs cannot
# starve the later ones below their floors. Earlier stages matter more, so a stage squeezed below its own floor
# still gets min(floor, left), and the later stages make do with less; a limit under 10 s is a SKIP with "no
# time left". A stage at its limit gets SIGINT (pytest then still writes its XML/JSON), SIGKILL 10 s later.
# A background stage (kernel-report) gets min(cap, left), costs the others no time, and is waited for at the end.
#
# Knobs: PYTHON (default python3), GPU_CHECK_SKIP="sanitize gpu-*" (stage names or globs; "gpu-tests" means
# every gpu-* stage), GPU_CHECK_BUDGET_S, TORCH_CUDA_ARCH_LIST (default "8.0;9.0a": 9.0a for Hopper's wgmma and
# TMA), MOEBERT_BUILD_CUDA, MAX_JOBS, MOEBERT_BENCH_MAX_ROUNDS (default 50). If the budget runs out, run it again
# on the still-warm machine with GPU_CHECK_SKIP="build warmup kernel-report verdicts bench-moe_ffn sanitize": the
# build and Triton's compile cache stay in place.
# CUTLASS headers (the GPU machine has no registry): MOEBERT_CUTLASS_DIR, else carry/cutlass if it holds
# include/cutlass (scripts/pack_gpu_carry.sh writes it; carry "carry/cutlass"); setup.py reads the variable.
# CPATH: if the toolkit lacks cusparse.h (ATen's CUDA headers include it), the include folders of the active
# python's pip CUDA wheels (nvidia/*/include) are prepended, as scripts/ci_cuda_build.sh does. The driver and
# the toolkit are never changed.
#
# Dry run (CI, no GPU): GPU_CHECK_DRY_RUN=1 replaces every stage's command by a stub that writes 50 log lines
# and the stage's output files, and passes; GPU_CHECK_DRY_RUN_FAIL / _TIMEOUT / _UNSUPPORTED="stage ..." make
# those stages fail, time out, or print compute-sanitizer's "Device not supported". Time is virtual there:
# each stage costs GPU_CHECK_DRY_RUN_COST="stage=seconds ..." (default 1 s); a cost over the stage's limit, or a
# requested timeout, is a TIMEOUT that costs the limit (a background stage costs the others nothing).
set -u
OUTDIR=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
RESERVE=20     # the last stage's SIGKILL grace, then the summary and the tarball
MIN_LIMIT=10   # below this a stage cannot even start pytest usefully
TAIL_LINES=40
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$WORK/gpu_check  # what the tarball holds
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
VCLOCK=0  # dry run: virtual seconds spent

now() {
  if [ "$DRY" = 1 ]; then echo $((START + VCLOCK)); else date +%s; fi
}

in_list() {  # in_list WORD "LIST": is WORD one of the words in LIST?
  [[ " $2 " == *" $1 "* ]]
}

skip_requested() {
  local w
  for w in ${GPU_CHECK_SKIP:-}; do
    # shellcheck disable=SC2053 - $w is a glob on purpose
    [[ $1 == $w ]] && return 0
    [ "$w" = gpu-tests ] && [[ $1 == gpu-* ]] && return 0
  done
  return 1
}

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
export MOEBERT_BUILD_CUDA=${MOEBERT_BUILD_CUDA:-1}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export MOEBERT_REQUIRE_GPU=1  # the GPU tests then fail, not skip, when a GPU backend is missing
export MOEBERT_BENCH_MAX_ROUNDS=${MOEBERT_BENCH_MAX_ROUNDS:-50}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda  # torch's guess from a wrapper nvcc on PATH can be wrong
fi

# ATen's CUDAContextLight.h includes cusparse.h and cublas_v2.h; a toolkit folder without them needs the
# headers of the pip CUDA wheels that torch itself links against.
note_setup() { echo "$*" | tee -a "$LOGS/setup.log"; }
note_setup "python: $PY ($(command -v "$PY" || echo 'not found'))"
note_setup "CUDA_HOME=${CUDA_HOME:-unset}"
if [ -z "${MOEBERT_CUTLASS_DIR:-}" ] && [ -f carry/cutlass/include/cutlass/cutlass.h ]; then
  export MOEBERT_CUTLASS_DIR=$PWD/carry/cutlass
fi
if [ -n "${MOEBERT_CUTLASS_DIR:-}" ]; then
  note_setup "MOEBERT_CUTLASS_DIR=$MOEBERT_CUTLASS_DIR (CUTLASS headers for the build)"
else
  note_setup "MOEBERT_CUTLASS_DIR: unset and no carry/cutlass (the build finds CUTLASS in the nvidia-cutlass wheel or skips the extension)"
fi
if [ -f "${CUDA_HOME:-/usr/local/cuda}/include/cusparse.h" ]; then
  note_setup "CPATH: unchanged (the toolkit has cusparse.h)"
else
  NV_INC=$("$PY" - 2>/dev/null <<'EOF'
import glob, os
import nvidia
dirs = []
for root in nvidia.__path__:
    for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
        if any(os.path.exists(os.path.join(inc, h)) for h in ("cusparse.h", "cublas_v2.h")):
            dirs.append(inc)
print(":".join(dirs))
EOF
  )
  if [ -n "$NV_INC" ]; then
    export CPATH="$NV_INC${CPATH:+:$CPATH}"
    note_setup "CPATH: the toolkit lacks cusparse.h; prepended the pip CUDA headers: $NV_INC"
  else
    note_setup "CPATH: the toolkit lacks cusparse.h and $PY has no pip CUDA headers (nvidia/*/include); the build may fail"
  fi
fi

# ---- the stages: name, cap, floor, command, output files (the dry run's stub creates those) -----------------
NAMES=(); CAPS=(); FLOORS=(); CMDS=(); OUTS=(); BACKGROUND=()
stage() { NAMES+=("$1"); CAPS+=("$2"); FLOORS+=("$3"); CMDS+=("$4"); OUTS+=("${5:-}"); BACKGROUND+=("${6:-0}"); }

PYTEST="$PY -m pytest -q -rs -p no:cacheprovider"
BENCH_ARGS="-q -rs -p no:cacheprovider --benchmark-min-rounds=5 --benchmark-max-time=0.25 --benchmark-columns=min,median,rounds"

stage env 30 10 "nvidia-smi; echo; $PY - <<'EOF'
import sys, torch
print('GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])
for m in ('triton', 'transformers', 'pytest', 'pytest_benchmark', 'pybind11', 'ninja', 'matplotlib'):
    try:
        mod = __import__(m); print(m, getattr(mod, '__version__', '?'))
    except Exception as e:
        print(m, 'MISSING', type(e).__name__)
EOF
echo; nvcc --version | tail -2; compute-sanitizer --version | head -2
echo CUDA_HOME=\${CUDA_HOME:-unset} CPATH=\${CPATH:-unset} TORCH_CUDA_ARCH_LIST=\$TORCH_CUDA_ARCH_LIST \
  MOEBERT_CUTLASS_DIR=\${MOEBERT_CUTLASS_DIR:-unset}"

# A build is reused when the sources it came from are unchanged (their hash is kept beside it in build/).
stage build 200 60 "set -o pipefail
hash=\$( (cat setup.py csrc/*; echo \"\$TORCH_CUDA_ARCH_LIST \${MOEBERT_CUTLASS_DIR:-}\") | sha256sum | cut -c1-16)
if [ -f build/gpu_check_built ] && [ \"\$(cat build/gpu_check_built)\" = \"\$hash\" ] && ls moebert_kernels/_C*.so >/dev/null 2>&1; then
  echo \"build: reusing moebert_kernels/_C (csrc/ and setup.py unchanged, \$hash)\"
else
  rm -f build/gpu_check_built
  $PY -m pip install --no-build-isolation --no-deps -v -e . && mkdir -p build && echo \"\$hash\" > build/gpu_check_built || exit 1
fi
$PY - <<'EOF'
from moebert_kernels import _cuda
ext, why = _cuda.load()
print('extension:', 'moebert_kernels._C loaded' if ext is not None else 'NOT loaded: ' + why)
from moebert_kernels.__main__ import report
print(report())
raise SystemExit(0 if ext is not None else 1)
EOF"

NPROC=$(nproc 2>/dev/null || echo 4)
stage warmup 120 30 "$PY scripts/kernel_report.py --warmup --dtypes bf16 --jobs $NPROC"
# CPUs only, so it runs beside the GPU stages; niced, and half the cores, to keep the benchmarks' launches fed.
stage kernel-report 400 0 "nice -n 10 $PY scripts/kernel_report.py --dtypes bf16 --jobs $(( (NPROC + 1) / 2 )) \
  --json $OUTDIR/kernel_report.json > $LOGS/kernel_report.md" "$OUTDIR/kernel_report.json $LOGS/kernel_report.md" 1
stage verdicts 150 60 "CUDA_LAUNCH_BLOCKING=1 $PYTEST tests/test_gpu_verdicts.py --junitxml=$LOGS/verdicts.xml" \
  "$LOGS/verdicts.xml"
# The numbers the first run must bring back: they get at least 150 s (the floor) whatever came before.
stage bench-moe_ffn 200 150 "$PY -m pytest benchmarks/test_bench_moe_ffn.py $BENCH_ARGS \
  --benchmark-json=$OUTDIR/bench_moe_ffn.json" "$OUTDIR/bench_moe_ffn.json"
stage sanitize 90 30 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 50 $PY scripts/sanitize_case.py --backends cuda"

# The GPU test files that only a GPU can run, before the secondary benchmarks: in the first run (2026-12-04,
# 550 s) those benchmarks spent the rest of the budget and no GPU test file ran. Floor 0 (a floor here would
# come out of the verdicts' time when the build runs long): they take what the later stages' floors leave.
gpu_test_stage() {  # gpu_test_stage FILE CAP FLOOR: one pytest process per file (an illegal address is sticky)
  [ -f "tests/test_$1.py" ] || return 0
  local blocking=""; [ "$1" = cuda_ext ] && blocking="CUDA_LAUNCH_BLOCKING=1 "
  stage "gpu-$1" "$2" "$3" "$blocking$PYTEST tests/test_$1.py --junitxml=$LOGS/gpu-$1.xml" "$LOGS/gpu-$1.xml"
}
gpu_test_stage expert_layer_norm 60 0
gpu_test_stage cuda_ext 60 0
gpu_test_stage triton_moe_ffn 160 0

JSONS="$OUTDIR/bench_moe_ffn.json"
# The secondary benchmarks measure for less time (at most 20 rounds of at most 0.1 s each): every one of them hit
# its cap in the first run. end_to_end first (BERT-base); tied and moe_ffn_gated reserve nothing (floor 0).
SECONDARY_BENCH_ARGS="-q -rs -p no:cacheprovider --benchmark-min-rounds=3 --benchmark-max-time=0.1 --benchmark-columns=min,median,rounds"
for f in end_to_end distill_loss expert_layer_norm tied moe_ffn_gated; do
  [ -f "benchmarks/test_bench_$f.py" ] || continue
  case $f in
    end_to_end) cap=40 floor=10 ;; distill_loss) cap=30 floor=10 ;; expert_layer_norm) cap=25 floor=10 ;;
    tied) cap=40 floor=0 ;; *) cap=25 floor=0 ;;
  esac
  stage "bench-$f" $cap $floor "MOEBERT_BENCH_MAX_ROUNDS=20 $PY -m pytest benchmarks/test_bench_$f.py $SECONDARY_BENCH_ARGS \
    --benchmark-json=$LOGS/bench_$f.json" "$LOGS/bench_$f.json"
  JSONS="$JSONS $LOGS/bench_$f.json"
done

stage report 20 10 "$PY benchmarks/report.py $JSONS --out $OUTDIR/BENCHMARKS.md --section gpu --plot $OUTDIR/moe_ffn_gpu.png \
  --command 'bash scripts/gpu_check.sh OUTDIR (pytest benchmarks/test_bench_moe_ffn.py $BENCH_ARGS, MOEBERT_BENCH_MAX_ROUNDS=$MOEBERT_BENCH_MAX_ROUNDS; the other benchmarks $SECONDARY_BENCH_ARGS, MOEBERT_BENCH_MAX_ROUNDS=20)'" \
  "$OUTDIR/BENCHMARKS.md $OUTDIR/moe_ffn_gpu.png"

# The rest of the GPU tests, cheapest first, on what is left (floor 0).
for f in distill_loss triton_moe_ffn_shared triton_device_guard families; do
  gpu_test_stage "$f" 60 0
done

# The demo on the GPU, when its model was carried here (python scripts/pack_demo_model.py carry/minilm).
if [ -d carry/minilm ]; then
  stage demo 150 0 "$PY -m moebert.cli demo --model carry/minilm --device cuda"
fi

# ---- running them ------------------------------------------------------------------------------------------
ST_STATUS=(); ST_SECS=(); ST_LIMIT=(); ST_NOTE=()

dry_cost() {  # virtual seconds of stage $1 in a dry run
  local kv
  for kv in ${GPU_CHECK_DRY_RUN_COST:-}; do
    [ "${kv%%=*}" = "$1" ] && { echo "${kv#*=}"; return; }
  done
  echo 1
}

# What a dry run runs instead of a stage's command: 50 log lines, its output files, the requested outcome.
dry_stub() {
  local name=$1 outs=$2 i f
  for i in $(seq 1 50); do echo "$name: dry-run log line $i of 50"; done
  for f in $outs; do
    case $f in
      *.xml) echo '<testsuites><testsuite name="dry-run" tests="0"/></testsuites>' > "$f" ;;
      *.json) echo '{"benchmarks": [], "machine_info": {}}' > "$f" ;;
      *) echo "dry run of $name" > "$f" ;;
    esac
  done
  if in_list "$name" "${GPU_CHECK_DRY_RUN_UNSUPPORTED:-}"; then
    echo "========= Error: Device not supported"; echo "========= ERROR SUMMARY: 1 error"; return 1
  fi
  in_list "$name" "${GPU_CHECK_DRY_RUN_TIMEOUT:-}" && { echo "$name: dry-run TIMEOUT as requested"; return 124; }
  in_list "$name" "${GPU_CHECK_DRY_RUN_FAIL:-}" && { echo "$name: dry-run FAILED as requested"; return 1; }
  echo "$name: dry-run passed; 3 passed in 0.01s"
  return 0
}

# One line that says what happened, from the stage's log (else its last non-empty line).
stage_note() {
  local log="$LOGS/$1.log" note=""
  case $1 in
    env) note=$(grep -m1 -E "^(GPU|torch)" "$log") ;;
    build) note=$(grep -m1 -E "^(extension:|build: reusing)" "$log") ;;
    sanitize) note=$({ grep -m1 "ERROR SUMMARY" "$log"; grep -m1 "^sanitize_case:" "$log"; } | tr '\n' ' ') ;;
    report) note=$(grep -m1 -E "wrote|Plot skipped|no benchmark" "$log") ;;
    warmup) note=$(grep -m1 "^kernel_report --warmup:" "$log") ;;
    kernel-report) note=$(grep -h -m1 "^kernel_report: [0-9]* rows" "$log" "$LOGS/kernel_report.md" 2>/dev/null | head -1) ;;
    *) note=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$log" | grep -E " in [0-9.]+s" | tail -1 | tr -d '=' \
         | sed 's/^ *//') ;;
  esac
  [ -n "$note" ] || note=$(grep -v '^\s*$' "$log" | tail -1)
  printf '%s' "$note" | cut -c1-110
}

write_summary() {
  local i
  {
    echo "## gpu_check summary ($(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(now) - START ))s of ${BUDGET}s$([ "$DRY" = 1 ] && echo ', DRY RUN'))"
    echo
    echo "| stage | status | seconds | limit | note |"
    echo "|---|---|---:|---:|---|"
    for i in "${!ST_STATUS[@]}"; do
      echo "| ${NAMES[$i]} | ${ST_STATUS[$i]} | ${ST_SECS[$i]} | ${ST_LIMIT[$i]} | ${ST_NOTE[$i]//|//} |"
    done
  } > "$OUTDIR/summary.md"
  cp "$OUTDIR/summary.md" "$LOGS/summary.md"
  tar -czf "$OUTDIR/.gpu_check.tar.gz.part" -C "$WORK" gpu_check && mv -f "$OUTDIR/.gpu_check.tar.gz.part" "$OUTDIR/gpu_check.tar.gz"
}

echo "plan (budget ${BUDGET}s, reserve ${RESERVE}s): stage cap floor"
for i in "${!NAMES[@]}"; do
  skip_requested "${NAMES[$i]}" && s=" (GPU_CHECK_SKIP)" || s=""
  b=""; [ "${BACKGROUND[$i]}" = 1 ] && b=" background"
  echo "  plan ${NAMES[$i]} ${CAPS[$i]} ${FLOORS[$i]}$b$s"
done

# verdict INDEX RC SECONDS LIMIT: the stage's status and note from its exit status and log.
verdict() {
  local i=$1 rc=$2 secs=$3 limit=$4 name=${NAMES[$1]} note status why
  note=$(stage_note "$name")
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT; note="stopped at its ${limit}s limit; $note" ;;
    *) status="FAIL($rc)" ;;
  esac
  if [ "$name" = sanitize ]; then  # the refusal may come with any exit status: the log decides
    why=$(grep -m1 -o "Device not supported.*" "$LOGS/$name.log")
    if [ -n "$why" ]; then
      status=SKIP; note="compute-sanitizer refuses this device (${why}); memcheck needs the other runtime"
    elif [ "$rc" = 127 ]; then
      status=SKIP; note="compute-sanitizer is not installed here"
    fi
  fi
  ST_STATUS[$i]=$status; ST_SECS[$i]=$secs; ST_LIMIT[$i]=$limit; ST_NOTE[$i]=$note
  echo "   -> $status in ${secs}s: $note"
  if [ "$status" = TIMEOUT ] || [[ $status == FAIL* ]]; then
    echo "---- last $TAIL_LINES lines of $name.log ----"
    tail -n "$TAIL_LINES" "$LOGS/$name.log"
    echo "---- end of $name.log ----"
  fi
  write_summary
}

ST_T0=(); BG_PIDS=()
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  if skip_requested "$name"; then
    ST_STATUS[$i]=SKIP; ST_SECS[$i]=0; ST_LIMIT[$i]=0; ST_NOTE[$i]=GPU_CHECK_SKIP
    echo "== [$name] SKIP (GPU_CHECK_SKIP)"; write_summary; continue
  fi
  later=0
  for ((j = i + 1; j < ${#NAMES[@]}; j++)); do
    skip_requested "${NAMES[$j]}" || later=$((later + FLOORS[j]))
  done
  left=$((BUDGET - RESERVE - ($(now) - START)))
  limit=$((left - later)); [ "$limit" -gt "${CAPS[$i]}" ] && limit=${CAPS[$i]}
  if [ "$limit" -lt "${FLOORS[$i]}" ]; then  # earlier stages matter more: take the floor from later ones
    limit=${FLOORS[$i]}; [ "$left" -lt "$limit" ] && limit=$left
  fi
  if [ "${BACKGROUND[$i]}" = 1 ]; then  # beside the others: it only has to end with the budget
    limit=$left; [ "$limit" -gt "${CAPS[$i]}" ] && limit=${CAPS[$i]}
  fi
  if [ "$limit" -lt "$MIN_LIMIT" ]; then
    ST_STATUS[$i]=SKIP; ST_SECS[$i]=0; ST_LIMIT[$i]=$limit; ST_NOTE[$i]="no time left in the ${BUDGET}s budget"
    echo "== [$name] SKIP (no time left: limit ${limit}s)"; write_summary; continue
  fi
  echo "== [$name] (limit ${limit}s$([ "${BACKGROUND[$i]}" = 1 ] && echo ', in the background')) ${CMDS[$i]%%$'\n'*}"
  { echo "\$ ${CMDS[$i]}"; echo; } > "$LOGS/$name.log"
  t0=$(now)
  if [ "${BACKGROUND[$i]}" = 1 ]; then
    ST_LIMIT[$i]=$limit; ST_T0[$i]=$t0
    if [ "$DRY" = 1 ]; then  # it runs now but costs no virtual time; its outcome is read at the end
      cost=$(dry_cost "$name")
      [ "$cost" -gt "$limit" ] && GPU_CHECK_DRY_RUN_TIMEOUT="${GPU_CHECK_DRY_RUN_TIMEOUT:-} $name"
      dry_stub "$name" "${OUTS[$i]}" >> "$LOGS/$name.log" 2>&1
      rc=$?; [ "$rc" = 124 ] && cost=$limit
      echo "$rc $((t0 + cost))" > "$WORK/$name.rc"
    else
      ( timeout -s INT -k 10 "$limit" bash -c "${CMDS[$i]}" >> "$LOGS/$name.log" 2>&1
        echo "$? $(date +%s)" > "$WORK/$name.rc" ) &
      BG_PIDS[$i]=$!
    fi
    ST_STATUS[$i]=RUNNING; ST_SECS[$i]=0; ST_NOTE[$i]="in the background"
    echo "   -> started in the background"; write_summary; continue
  fi
  if [ "$DRY" = 1 ]; then
    cost=$(dry_cost "$name")
    [ "$cost" -gt "$limit" ] && GPU_CHECK_DRY_RUN_TIMEOUT="${GPU_CHECK_DRY_RUN_TIMEOUT:-} $name"  # as timeout would
    dry_stub "$name" "${OUTS[$i]}" >> "$LOGS/$name.log" 2>&1
    rc=$?
    if [ "$rc" = 124 ]; then VCLOCK=$((VCLOCK + limit)); else VCLOCK=$((VCLOCK + cost)); fi
  else
    timeout -s INT -k 10 "$limit" bash -c "${CMDS[$i]}" >> "$LOGS/$name.log" 2>&1
    rc=$?
  fi
  verdict "$i" "$rc" $(( $(now) - t0 )) "$limit"
done

# The background stages: wait for each (its own timeout bounds the wait), then its verdict.
for i in "${!NAMES[@]}"; do
  [ "${BACKGROUND[$i]}" = 1 ] && [ "${ST_STATUS[$i]}" = RUNNING ] || continue
  [ -n "${BG_PIDS[$i]:-}" ] && wait "${BG_PIDS[$i]}"
  read -r rc t_end < "$WORK/${NAMES[$i]}.rc" || { rc=1; t_end=$(now); }
  echo "== [${NAMES[$i]}] (background) finished"
  verdict "$i" "$rc" $(( t_end - ST_T0[i] )) "${ST_LIMIT[$i]}"
done

write_summary
cat "$OUTDIR/summary.md"
echo
echo "OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"

# Exit 0 only if every stage passed, or was skipped on request or because the device refuses the tool.
for i in "${!ST_STATUS[@]}"; do
  [ "${ST_STATUS[$i]}" = PASS ] && continue
  [ "${ST_STATUS[$i]}" = SKIP ] && [ "${ST_NOTE[$i]}" != "no time left in the ${BUDGET}s budget" ] && continue
  exit 1
done
exit 0
