#!/usr/bin/env bash
# The issue-3 loader measurement on a GPU machine: 10,000 synthetic ImageNet-like
# JPEGs, every backend at batch 256, 224 px, two views, all CPU cores; results under
# profiling/results/<gpu>/ (JSON + the log). DALI must be importable (on the lent
# machine: ../shared/tools/carry-dali.sh first); FFCV runs only if its extension loads.
# Usage: profiling/scripts/gpu_loader_bench.sh [OUT_DIR] [DATA_DIR]
set -euo pipefail
OUT=${1:-profiling/results/$(python3 -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')}
DATA=${2:-/tmp/iecl-synthetic-10k}
mkdir -p "$OUT"
source "$(dirname "$0")/iecl.sh"
iecl make-synthetic "$DATA" --images 10000 --classes 100
backends="pil dali"
python3 -c 'import ffcv.libffcv' 2>/dev/null && backends="$backends ffcv" || echo "ffcv: extension does not load here; skipped"
iecl bench loader --backend $backends --decode shared window --data "$DATA" --beton /tmp/iecl-synthetic-10k.beton \
  --batch-size 256 --image-size 224 --steps 40 --warmup 8 --device cuda --json "$OUT/loader_224px_b256.json" \
  2>&1 | tee "$OUT/loader_224px_b256.log"
