#!/usr/bin/env bash
# The GPU measurements of profiling/results/<gpu>/ (issues 4 and 6), one stage per
# call so that each fits a 10-minute command. Every stage appends to
# $RESULTS/commands.log the exact commands it ran, and keeps its console output
# beside its JSON. DALI must be importable for the loader stages
# (../shared/tools/carry-dali.sh on the lent machine).
#
#   profiling/scripts/gpu_results.sh kernels      # CUDA kernel tests, SAIB kernels bench, CUDA smoke of profile/compare
#   profiling/scripts/gpu_results.sh profile      # iecl profile, data on the GPU: R50 and R18, traces (SAIB_IMPL=triton for the kernels)
#   profiling/scripts/gpu_results.sh profile-compile   # the same for R50 with train.compile=true
#   profiling/scripts/gpu_results.sh loader       # synthetic ImageNet-like data, loader bench, profile with DALI
#   profiling/scripts/gpu_results.sh compare-r50  # iecl compare, all methods +-SAIB, DALI loader, compile off
#   profiling/scripts/gpu_results.sh compare-r18
#   profiling/scripts/gpu_results.sh compare-compile   # R50, compile on, IE-CL and SimCLR +-SAIB
set -uo pipefail
STAGE=$1
GPU=$(python3 -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
RESULTS=${RESULTS:-profiling/results/$GPU}
TRACES=${TRACES:-/tmp/iecl-traces}
DATA=${DATA:-/tmp/iecl-synthetic-10k}
mkdir -p "$RESULTS" "$TRACES"
source "$(dirname "$0")/iecl.sh"
# The SAIB implementation to time: reference (cuDNN) was 3.4x faster in the step than the Triton
# kernels on the H100 (README.md beside the results), so it is the default here.
SAIB_IMPL=${SAIB_IMPL:-reference}
FAST="kernels.saib_impl=$SAIB_IMPL kernels.view_prep=triton train.precision=bf16 train.channels_last=true"
LOADER="data.root=$DATA data.backend=dali data.workers=16"

run() {  # run NAME CMD...: log the command, keep its output in $RESULTS/NAME.log
  local name=$1; shift
  echo "\$ $*" | tee -a "$RESULTS/commands.log"
  PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "FAILED ($rc): $name" | tee -a "$RESULTS/commands.log"
}

case $STAGE in
kernels)
  { nvidia-smi; python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version(), "| triton", triton.__version__)'; } > "$RESULTS/machine.txt" 2>&1
  cat "$RESULTS/machine.txt"
  run kernel_tests python3 -m pytest -q -p no:cacheprovider tests/test_kernels_saib.py tests/test_kernels_view_prep.py tests/test_view_prep.py tests/test_saib.py
  run saib_b256_224px_p16_bf16 iecl bench saib --batch-size 256 --image-size 224 --patch 16 --dtype bf16 --iters 50 --warmup 10 --json "$RESULTS/saib_b256_224px_p16_bf16.json"
  run smoke_profile iecl profile --data-on-device train.device=cuda $FAST train.batch_size=32 --steps 3 --warmup 2 --isolate-iters 2
  run smoke_compare iecl compare --no-loader train.device=cuda $FAST train.batch_size=32 --methods iecl byol --steps 3 --warmup 2 --out /tmp/smoke-compare
  ;;
profile)
  for net in r50 r18; do
    run "profile_${net}_iecl_b256_$SAIB_IMPL" iecl profile --config imagenet_$net --data-on-device $FAST --steps 15 --warmup 5 \
      --isolate-iters 5 --trace "$TRACES/trace_${net}_iecl_b256_$SAIB_IMPL.json.gz" --json "$RESULTS/profile_${net}_iecl_b256_$SAIB_IMPL.json"
  done
  ;;
profile-compile)  # R50 IE-CL's compile warm-up did not finish within 5 minutes on the H100: give it a call of its own
  run profile_r50_iecl_b256_compile iecl profile --config imagenet_r50 --data-on-device $FAST train.compile=true \
    --steps 15 --warmup 5 --isolate-iters 5 --json "$RESULTS/profile_r50_iecl_b256_compile.json"
  ;;
loader)
  iecl make-synthetic "$DATA" --images 10000 --classes 100 2>&1 | tail -2
  run loader_224px_b256 iecl bench loader --backend pil dali --decode shared window --data "$DATA" \
    --batch-size 256 --image-size 224 --steps 40 --warmup 8 --device cuda --json "$RESULTS/loader_224px_b256.json"
  run profile_r50_iecl_b256_dali iecl profile --config imagenet_r50 $FAST $LOADER --steps 30 --warmup 10 \
    --json "$RESULTS/profile_r50_iecl_b256_dali.json"
  ;;
compare-r50 | compare-r18)
  net=${STAGE#compare-}
  run "compare_${net}_b256" iecl compare --config imagenet_$net $FAST $LOADER --steps 15 --warmup 5 \
    --out "$RESULTS/compare_${net}_b256"
  ;;
compare-compile)
  run compare_r50_b256_compile iecl compare --config imagenet_r50 $FAST $LOADER train.compile=true \
    --methods iecl simclr --steps 15 --warmup 5 --out "$RESULTS/compare_r50_b256_compile"
  ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
