#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in one go (see benchmarks/RESULTS.md).
#
#   bash benchmarks/gpu_session.sh [check|sweep|table|sparse|all]   (default: all)
#
# Runs from a bare checkout on a machine with torch and triton but without this project
# installed: wheels of the missing dependencies (compressed-tensors, pydantic, ...) may be put in
# .whl/ beforehand and are installed into /tmp/site; the repository root goes on PYTHONPATH and
# compressor/kernels points at kernels/ (the package mapping pyproject.toml would set up).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e compressor/kernels ] || ln -s ../kernels compressor/kernels
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
what="${1:-all}"
case "$what" in check|all) python3 benchmarks/gpu_runtime_check.py ;; esac
case "$what" in sweep|all) python3 benchmarks/gpu_kernels.py --sweep --bits 4 --group 128 ;; esac
case "$what" in table|all) python3 benchmarks/gpu_kernels.py --bits 4 --group 128 && python3 benchmarks/gpu_kernels.py --bits 8 --group 0 ;; esac
case "$what" in sparse|all) python3 benchmarks/gpu_kernels.py --sparse24 ;; esac
