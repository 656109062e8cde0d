#!/usr/bin/env bash
# CI check of the CUDA extension on a machine with no GPU: build moebert_kernels._C for
# sm_80 and sm_90a (CUTLASS 2.x and 3.x GEMMs) the way a user's `pip install -e .` does, against the CUDA build of torch
# in its own venv, then import it and run tests/test_cuda_ext.py there.
#
# The build happens in a copy of the tree under build/ci-cuda/ (git-ignored), so the .so
# never lands in moebert_kernels/ where the CPU venv's tests would pick it up. Any compile
# or link error fails the script.
#
# Env: MOEBERT_CUDA_VENV (default .venv-cuda), MAX_JOBS (default 2),
#      TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), CUDA_HOME (default /usr/local/cuda).
# The CUTLASS headers come from the pinned nvidia-cutlass wheel (headers only: --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${MOEBERT_CUDA_VENV:-.venv-cuda}
COPY=$ROOT/build/ci-cuda/src
T0=$(date +%s)

# 1. venv with the CUDA build of torch (about 50 s and 5.5 GB the first time).
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$ROOT/$VENV/bin/python
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.__version__.startswith('2.14.1') else 1)" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.14.1" numpy setuptools wheel ninja pybind11 pytest
fi
"$PY" -c "import ninja, pybind11, pytest, setuptools" 2>/dev/null || "$PY" -m pip install -q numpy setuptools wheel ninja pybind11 pytest
CUTLASS_PIN=$(sed -n 's/^CUTLASS_PIN = "\(.*\)"$/\1/p' setup.py)
"$PY" -m pip show "${CUTLASS_PIN%%==*}" 2>/dev/null | grep -q "^Version: ${CUTLASS_PIN##*==}$" \
  || "$PY" -m pip install -q --no-deps "$CUTLASS_PIN"

# 2. toolchain: nvcc on PATH is a wrapper, so torch cannot derive CUDA_HOME from it, and
#    ATen's CUDA headers want cusparse.h / cublas_v2.h, which ship in torch's nvidia wheels.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NV_INC=$("$PY" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'include'))")
export CPATH="$NV_INC${CPATH:+:$CPATH}"
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
export MOEBERT_BUILD_CUDA=1

# 3. a fresh copy of the tracked and untracked-but-not-ignored files.
rm -rf "$COPY"
mkdir -p "$COPY"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xf - -C "$COPY"

# 4. build and install as a user would (editable, no build isolation, no deps).
T1=$(date +%s)
(cd "$COPY" && "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
T2=$(date +%s)
ls "$COPY"/moebert_kernels/_C*.so >/dev/null

# 5. import it and run the extension's tests from the copy.
(cd "$COPY" && "$PY" -c "import moebert_kernels._C, torch; print('built for:', moebert_kernels._C.cuda_archs); import os; want = os.environ['TORCH_CUDA_ARCH_LIST'].replace(';', ','); assert moebert_kernels._C.cuda_archs == want, (moebert_kernels._C.cuda_archs, want); print('moebert_C ops:', sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith('moebert_C::')))")
(cd "$COPY" && "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ext.py)
T3=$(date +%s)

# The editable install points into build/; drop it so the venv does not keep a stale path.
"$PY" -m pip uninstall -q -y moebert-kernels || true
if compgen -G "$ROOT/moebert_kernels/_C*.so" >/dev/null; then
  echo "ci_cuda_build: a _C*.so was left in $ROOT/moebert_kernels" >&2
  exit 1
fi
echo "ci_cuda_build: ok (setup $((T1 - T0)) s, build $((T2 - T1)) s, import+tests $((T3 - T2)) s, total $((T3 - T0)) s)"

# ---- kernel report (issue 22/21): every kernel in the built fatbin, per arch; a GEMM that spills fails CI ------
# (scripts/kernel_report.py --no-triton: the Triton kernels have their own CI test, tests/test_kernel_report.py.)
SO=$(ls "$COPY"/moebert_kernels/_C*.so 2>/dev/null | head -1 || true)
[ -n "$SO" ] || { echo "ci_cuda_build: no _C*.so to report on" >&2; exit 1; }
"$PY" scripts/kernel_report.py --no-triton --cuda-so "$SO" --arch sm_90a,sm_80 --check spill \
  --json "$ROOT/build/ci-cuda/kernel_report.json"
echo "ci_cuda_build: kernel report ok (no spills in CUDA C++ GEMMs): build/ci-cuda/kernel_report.json"
