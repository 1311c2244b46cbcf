#!/usr/bin/env bash
# The kernel tests on a GPU: every Triton kernel against its PyTorch reference
# on CUDA tensors (on a CPU the suite runs them in Triton's interpreter). The
# log goes to profiling/results/<gpu>/<date>/kernel_tests.log (or $1). Needs
# pytest and this checkout only; the measurements are `gpu_report.sh`'s.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
GPU=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
LOG=${1:-$ROOT/profiling/results/$GPU/$(date -u +%Y-%m-%d)/kernel_tests.log}
mkdir -p "$(dirname "$LOG")"
# tests/conftest.py makes a checkout with no installation importable as iecl.
cd "$ROOT" && PYTHONUNBUFFERED=1 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels_saib.py \
  tests/test_kernels_view_prep.py tests/test_view_prep.py tests/test_saib.py 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
