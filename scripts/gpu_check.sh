#!/usr/bin/env bash
# One command for a lent GPU machine (no registry access): build, verdicts, sanitize, tests, benchmarks, report.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Made to fit one 600 s remote command that returns at most 8 files. OUTDIR ends up holding only:
#   gpu_check.tar.gz   every stage log, junit XML and benchmark JSON (plus setup.log and summary.md)
#   summary.md         one row per stage: status, seconds, limit, one-line note
#   BENCHMARKS.md      the report's GPU section          moe_ffn_gpu.png   its plot
# The tarball and summary are rewritten after every stage, so a run cut off from outside keeps what it had.
# Stdout: the plan, one header and one verdict line per stage, the last 40 lines of the log of any stage that
# failed or timed out, and the summary.
#
# Stages, in this order (each its own process; a failed stage never stops the next one):
#   env                      versions, nvidia-smi, nvcc, compute-sanitizer
#   build                    pip install --no-build-isolation --no-deps -e . (MOEBERT_BUILD_CUDA=1,
#                            TORCH_CUDA_ARCH_LIST=9.0), then checks that moebert_kernels._C loads; reuses a build
#                            whose csrc/ and setup.py are unchanged (a second run on a warm machine)
#   verdicts                 tests/test_gpu_verdicts.py: every backend at BERT sizes, bf16 vs the fp32 reference
#   sanitize                 compute-sanitizer memcheck on scripts/sanitize_case.py; "Device not supported" is a
#                            SKIP with that reason (one of the two runtimes refuses the device)
#   gpu-<file>               the rest of the GPU matrix, one pytest process per file (an illegal address is
#                            sticky: it must not fail the files after it); CUDA_LAUNCH_BLOCKING=1 for the CUDA C++
#                            tests, so a fault is reported at the launch that made it
#   bench-<file>             pytest benchmarks/test_bench_<file>.py --benchmark-json (E=4 rows for moe_ffn)
#   report                   benchmarks/report.py -> OUTDIR/BENCHMARKS.md and OUTDIR/moe_ffn_gpu.png
#   demo                     moebert demo --device cuda, only if carry/minilm exists (scripts/pack_demo_model.py)
#   tests                    the rest of the suite, with whatever time is left
# Exit 0 only if every stage passed or was skipped on request or for an unsupported device.
#
# Budget: GPU_CHECK_BUDGET_S (default 540 s). Each stage has a cap and a floor. With left = BUDGET - RESERVE -
# elapsed, a stage's limit is min(cap, left - the floors of the stages after it): a stage that hangs cannot
# starve the later ones below their floors. Earlier stages matter more, so a stage squeezed below its own floor
# still gets min(floor, left), and the later stages make do with less; a limit under 10 s is a SKIP with "no
# time left". A stage at its limit gets SIGINT (pytest then still writes its XML/JSON), SIGKILL 10 s later.
#
# Knobs: PYTHON (default python3), GPU_CHECK_SKIP="sanitize gpu-*" (stage names or globs; "gpu-tests" means
# every gpu-* stage), GPU_CHECK_BUDGET_S, TORCH_CUDA_ARCH_LIST, MOEBERT_BUILD_CUDA, MAX_JOBS,
# MOEBERT_BENCH_MAX_ROUNDS (default 50). If the budget runs out, run it again on the still-warm machine with
# GPU_CHECK_SKIP="build verdicts sanitize": the build and Triton's compile cache stay in place.
# CPATH: if the toolkit lacks cusparse.h (ATen's CUDA headers include it), the include folders of the active
# python's pip CUDA wheels (nvidia/*/include) are prepended, as scripts/ci_cuda_build.sh does. The driver and
# the toolkit are never changed.
#
# Dry run (CI, no GPU): GPU_CHECK_DRY_RUN=1 replaces every stage's command by a stub that writes 50 log lines
# and the stage's output files, and passes; GPU_CHECK_DRY_RUN_FAIL / _TIMEOUT / _UNSUPPORTED="stage ..." make
# those stages fail, time out, or print compute-sanitizer's "Device not supported". Time is virtual there:
# each stage costs GPU_CHECK_DRY_RUN_COST="stage=seconds ..." (default 1 s); a cost over the stage's limit, or a
# requested timeout, is a TIMEOUT that costs the limit.
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

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
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
NAMES=(); CAPS=(); FLOORS=(); CMDS=(); OUTS=()
stage() { NAMES+=("$1"); CAPS+=("$2"); FLOORS+=("$3"); CMDS+=("$4"); OUTS+=("${5:-}"); }

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
echo CUDA_HOME=\${CUDA_HOME:-unset} CPATH=\${CPATH:-unset} TORCH_CUDA_ARCH_LIST=\$TORCH_CUDA_ARCH_LIST"

# A build is reused when the sources it came from are unchanged (their hash is kept beside it in build/).
stage build 200 60 "set -o pipefail
hash=\$(cat setup.py csrc/* | sha256sum | cut -c1-16)
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

stage verdicts 150 60 "CUDA_LAUNCH_BLOCKING=1 $PYTEST tests/test_gpu_verdicts.py --junitxml=$LOGS/verdicts.xml" \
  "$LOGS/verdicts.xml"
stage sanitize 90 30 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 50 $PY scripts/sanitize_case.py"

# Cheapest first, so a file that hits its cap leaves the others' results; test_triton_moe_ffn.py compiles the
# most Triton variants.
GPU_FILES="expert_layer_norm distill_loss cuda_ext triton_moe_ffn"
IGNORES="--ignore=tests/test_gpu_verdicts.py"
for f in $GPU_FILES; do
  [ -f "tests/test_$f.py" ] || continue
  IGNORES="$IGNORES --ignore=tests/test_$f.py"
  case $f in
    expert_layer_norm) cap=40 floor=10 ;; distill_loss) cap=60 floor=15 ;; cuda_ext) cap=60 floor=15 ;;
    *) cap=150 floor=30 ;;
  esac
  blocking=""; [ "$f" = cuda_ext ] && blocking="CUDA_LAUNCH_BLOCKING=1 "
  stage "gpu-$f" $cap $floor "$blocking$PYTEST tests/test_$f.py --junitxml=$LOGS/gpu-$f.xml" "$LOGS/gpu-$f.xml"
done

JSONS=""
# tied and moe_ffn_gated reserve nothing (floor 0): they run on what is left, never squeezing the verdicts.
for f in moe_ffn distill_loss expert_layer_norm end_to_end tied moe_ffn_gated; do
  [ -f "benchmarks/test_bench_$f.py" ] || continue
  case $f in
    moe_ffn) cap=120 floor=40 knobs="MOEBERT_BENCH_EXPERTS=4 " ;; distill_loss) cap=40 floor=10 knobs="" ;;
    expert_layer_norm) cap=30 floor=10 knobs="" ;; tied) cap=60 floor=0 knobs="" ;;
    moe_ffn_gated) cap=30 floor=0 knobs="" ;; *) cap=45 floor=10 knobs="" ;;
  esac
  stage "bench-$f" $cap $floor "$knobs$PY -m pytest benchmarks/test_bench_$f.py $BENCH_ARGS --benchmark-json=$LOGS/bench_$f.json" \
    "$LOGS/bench_$f.json"
  JSONS="$JSONS $LOGS/bench_$f.json"
done

stage report 20 10 "$PY benchmarks/report.py $JSONS --out $OUTDIR/BENCHMARKS.md --section gpu --plot $OUTDIR/moe_ffn_gpu.png \
  --command 'bash scripts/gpu_check.sh OUTDIR (pytest benchmarks/test_bench_<name>.py $BENCH_ARGS, MOEBERT_BENCH_MAX_ROUNDS=$MOEBERT_BENCH_MAX_ROUNDS)'" \
  "$OUTDIR/BENCHMARKS.md $OUTDIR/moe_ffn_gpu.png"

# The demo on the GPU, when its model was carried here (python scripts/pack_demo_model.py carry/minilm).
if [ -d carry/minilm ]; then
  stage demo 150 20 "$PY -m moebert.cli demo --model carry/minilm --device cuda"
fi

# Last: the rest of the suite (CI runs it on CPU anyway); it gets whatever time is left.
stage tests 150 0 "$PYTEST tests $IGNORES --junitxml=$LOGS/tests.xml" "$LOGS/tests.xml"

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
  echo "  plan ${NAMES[$i]} ${CAPS[$i]} ${FLOORS[$i]}$s"
done

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
  if [ "$limit" -lt "$MIN_LIMIT" ]; then
    ST_STATUS[$i]=SKIP; ST_SECS[$i]=0; ST_LIMIT[$i]=$limit; ST_NOTE[$i]="no time left in the ${BUDGET}s budget"
    echo "== [$name] SKIP (no time left: limit ${limit}s)"; write_summary; continue
  fi
  echo "== [$name] (limit ${limit}s) ${CMDS[$i]%%$'\n'*}"
  { echo "\$ ${CMDS[$i]}"; echo; } > "$LOGS/$name.log"
  t0=$(now)
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
  ST_STATUS[$i]=$status; ST_SECS[$i]=$(( $(now) - t0 )); ST_LIMIT[$i]=$limit; ST_NOTE[$i]=$note
  echo "   -> $status in ${ST_SECS[$i]}s: $note"
  if [ "$status" = TIMEOUT ] || [[ $status == FAIL* ]]; then
    echo "---- last $TAIL_LINES lines of $name.log ----"
    tail -n "$TAIL_LINES" "$LOGS/$name.log"
    echo "---- end of $name.log ----"
  fi
  write_summary
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
