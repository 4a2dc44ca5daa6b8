#!/usr/bin/env bash
# The GPU suite for a lent device (about 8 minutes on one H100): build the CUDA extension, run the
# `gpu` tests, then measure training tokens/s and MFU of a ~1.3B GPT in bf16 and the NCCL all-reduce
# bandwidth (bench/gpu_suite.py), and print one table.
#
#   bash bench/gpu_suite.sh            # on the GPU machine, from the repository root or anywhere
#   bash bench/gpu_suite.sh --dry-run  # on CPU: the measurement steps at tiny sizes (in the tests)
#
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3); its torch is used
# as it is (a CUDA build), never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ "${1:-}" = "--dry-run" ]; then
  exec "$PYTHON" bench/gpu_suite.py --dry-run
fi
start=$(date +%s)
echo "== build (CUDA extension, against the installed torch)"
timeout 300 "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
"$PYTHON" -c "import torch, megatron_lite._fused_kernels as k; assert torch.cuda.is_available(); print('cuda', torch.version.cuda, torch.cuda.get_device_name(), 'kernels', k.__file__)"
echo "== gpu tests"
timeout 180 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider
echo "== measurements"
timeout 360 "$PYTHON" bench/gpu_suite.py
echo "suite took $(($(date +%s) - start)) s"
