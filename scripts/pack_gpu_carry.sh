#!/usr/bin/env bash
# Write carry/cutlass: the CUTLASS/CuTe headers of the pinned nvidia-cutlass wheel, for a GPU machine
# that has no registry. setup.py finds them there when the wheel is not installed (or point
# MOEBERT_CUTLASS_DIR at the folder). About 28 MB; carry it with the run (device tool: carry=["carry/cutlass"]).
#
#   bash scripts/pack_gpu_carry.sh [PYTHON]     (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PIN=$(sed -n 's/^CUTLASS_PIN = "\(.*\)"$/\1/p' setup.py)
SRC=$("$PY" -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))" 2>/dev/null) || {
  echo "pack_gpu_carry: the CUTLASS headers are not installed for $PY; run: $PY -m pip install --no-deps $PIN" >&2
  exit 1
}
VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('nvidia-cutlass'))")
[ "nvidia-cutlass==$VERSION" = "$PIN" ] || echo "pack_gpu_carry: warning: installed nvidia-cutlass $VERSION, setup.py pins $PIN" >&2
# Whole or absent: build beside, then swap in.
TMP=carry/.cutlass.tmp
rm -rf "$TMP"
mkdir -p "$TMP/tools/util"
cp -r "$SRC/include" "$TMP/include"
cp -r "$SRC/tools/util/include" "$TMP/tools/util/include"
echo "nvidia-cutlass==$VERSION" > "$TMP/VERSION"
rm -rf carry/cutlass
mv "$TMP" carry/cutlass
echo "pack_gpu_carry: carry/cutlass ($(du -sm carry/cutlass | cut -f1) MB, nvidia-cutlass==$VERSION)"
