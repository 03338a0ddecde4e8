#!/usr/bin/env bash
# Create a separate virtualenv with mergekit for the side-by-side merge benchmark
# (benchmarks/merge_vs_mergekit.py). mergekit pins its own dependencies, so it gets its
# own venv; torch is installed first at the local 2.13.0 CPU wheel and pinned through a
# constraints file so that no dependency can swap it.
#
# Usage: bash benchmarks/setup_mergekit_venv.sh
# Env:   PYTHON (default python3), MERGEKIT_SPEC (default mergekit==0.1.5), FORCE=1 to rebuild.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-mergekit"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
MERGEKIT_SPEC="${MERGEKIT_SPEC:-mergekit==0.1.5}"

works() {
    [ -x "$VENV/bin/python" ] || return 1
    HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
assert torch.__version__.startswith("2.13.0")
PY
}

print_versions() {
    "$VENV/bin/python" - <<'PY'
from importlib.metadata import version
for pkg in ("mergekit", "torch", "transformers", "safetensors"):
    print(f"{pkg}=={version(pkg)}")
PY
}

if [ "${FORCE:-0}" != "1" ] && works; then
    echo "[setup] $VENV already works; skipping install"
    print_versions
    exit 0
fi
[ "${FORCE:-0}" = "1" ] && rm -rf "$VENV"

echo "[setup] creating venv at $VENV"
"$PYTHON" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"
CONSTRAINTS="$VENV/constraints.txt"
echo "$TORCH_SPEC" > "$CONSTRAINTS"

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
echo "[setup] installing $TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC"
echo "[setup] installing $MERGEKIT_SPEC (torch pinned via $CONSTRAINTS)"
"${PIP[@]}" install -c "$CONSTRAINTS" "$MERGEKIT_SPEC"

if ! works; then
    echo "[setup] ERROR: venv installed but the import check failed:" >&2
    HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "from mergekit.merge import run_merge" >&2
    exit 1
fi
echo "[setup] done"
print_versions
