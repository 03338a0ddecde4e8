#!/usr/bin/env bash
# Create a separate virtualenv with llm-compressor for the side-by-side benchmark
# (benchmarks/llmcompressor_gptq.py). CPU-only: torch is pinned to the local
# 2.13.0 CPU wheel through a constraints file so that no dependency can swap it
# for a CUDA build.
#
# Usage: bash benchmarks/setup_llmcompressor_venv.sh
# Env:   PYTHON (default python3), LLMCOMPRESSOR_SPEC (default llmcompressor==0.14.0.1),
#        FORCE=1 to rebuild the venv from scratch.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-llmcompressor"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
# Newest release at the time of writing; requires torch>=2.10,<=2.14, so it
# accepts the 2.13.0 CPU wheel.
LLMCOMPRESSOR_SPEC="${LLMCOMPRESSOR_SPEC:-llmcompressor==0.14.0.1}"

print_versions() {
    "$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
for pkg in ("llmcompressor", "compressed-tensors", "transformers", "torch"):
    print(f"{pkg}=={version(pkg)}")
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("torch.cuda.is_available():", torch.cuda.is_available())
EOF
}

works() {
    [ -x "$VENV/bin/python" ] || return 1
    HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import torch, datasets, transformers, compressed_tensors
import llmcompressor
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.pruning import SparseGPTModifier
assert torch.__version__.startswith("2.13.0")
EOF
}

if [ "${FORCE:-0}" != "1" ] && works; then
    echo "[setup] $VENV already works; skipping install"
    print_versions
    exit 0
fi

if [ "${FORCE:-0}" = "1" ]; then
    rm -rf "$VENV"
fi

echo "[setup] creating venv at $VENV"
"$PYTHON" -m venv "$VENV"
# Keep the venv out of git.
echo '*' > "$VENV/.gitignore"

CONSTRAINTS="$VENV/constraints.txt"
echo "$TORCH_SPEC" > "$CONSTRAINTS"

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
echo "[setup] installing $TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC"
echo "[setup] installing $LLMCOMPRESSOR_SPEC (torch pinned via $CONSTRAINTS)"
"${PIP[@]}" install -c "$CONSTRAINTS" "$LLMCOMPRESSOR_SPEC"

if ! works; then
    echo "[setup] ERROR: venv installed but import check failed:" >&2
    HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import llmcompressor; from llmcompressor import oneshot" >&2
    exit 1
fi
# Guard against any nvidia-* CUDA runtime wheels sneaking in with a CUDA torch.
if "${PIP[@]}" list 2>/dev/null | grep -qiE '^nvidia-(cu|cuda|cudnn|nccl)'; then
    echo "[setup] WARNING: CUDA runtime wheels were installed" >&2
fi
echo "[setup] done"
print_versions
