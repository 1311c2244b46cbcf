#!/usr/bin/env bash
# `iecl report` on a GPU machine, run from this source checkout with no
# installation (for machines with no package index, where `pip install -e .`
# cannot run): the report goes to profiling/results/<gpu>/<date>/ (or
# $IECL_REPORT_OUT) and its .tar.gz beside it. Any `iecl report` option passes
# through, e.g. --budget-minutes 8, --parts machine saib data, --dry-run.
#
#   profiling/scripts/gpu_report.sh
#   IECL_REPORT_OUT=/tmp/report profiling/scripts/gpu_report.sh --parts machine saib data
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
GPU=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu")')
OUT=${IECL_REPORT_OUT:-$ROOT/profiling/results/$GPU/$(date -u +%Y-%m-%d)}
PYTHONUNBUFFERED=1 exec "$PYTHON" "$ROOT" report --out "$OUT" --pack "$@"
