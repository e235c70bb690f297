#!/usr/bin/env bash
# Record the benchmark on this machine's GPU under bench/results/<gpu>/:
#   the resnet50 suite (both layouts) per dtype: .txt table, .json, .csv, .png
#   the ResNet-50 training step (images/s), channels_last and NCHW, AMP bf16 and fp32.
# Each dbn-bench call stays under ~10 minutes on an H100 (torch.compile dominates: it compiles
# every case afresh); pass extra dbn-bench options through DBN_BENCH_ARGS, e.g.
#   DBN_BENCH_ARGS="--budget-ms 60" bench/record_gpu_results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
dir="bench/results/$gpu"
mkdir -p "$dir"
for dtype in bfloat16 float32; do
  dbn-bench --suite resnet50 --dtype "$dtype" --layout both --no-progress ${DBN_BENCH_ARGS:-} \
    --json "$dir/resnet50-$dtype.json" --csv "$dir/resnet50-$dtype.csv" \
    --plot "$dir/resnet50-$dtype.png" | tee "$dir/resnet50-$dtype.txt" \
    || echo "dbn-bench: some rows FAILED their check (see $dir/resnet50-$dtype.txt)"
done
dbn-bench --model resnet50 --dtype bfloat16 float32 --layout both --no-progress ${DBN_BENCH_ARGS:-} \
  --json "$dir/train-step-resnet50.json" | tee "$dir/train-step-resnet50.txt" \
  || echo "dbn-bench: some variants FAILED (see $dir/train-step-resnet50.txt)"
echo "results in $dir"
