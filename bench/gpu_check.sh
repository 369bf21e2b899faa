#!/usr/bin/env bash
# Engine vs the plain PyTorch loop on one GPU, synthetic 224 px input: ResNet-50 (with
# --compile measured too), ResNet-18 (batch 256) and ViT-B/16 (batch 128).
# Needs only torch, torchvision, pandas, plotly and this repo; about 3-4 minutes on one H100.
#
#   bench/gpu_check.sh [OUTPUT_DIR]     (default: $OUT if set, else /tmp/gpu_bench)
#
# Prints the text table, then the markdown table for the README; writes gpu_bench.json,
# gpu_bench.txt and gpu_bench.md into OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${1:-${OUT:-/tmp/gpu_bench}}"
mkdir -p "$out_dir"
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print(torch.cuda.get_device_name())'
start=$(date +%s)
PYTHONPATH=. python3 bench/run.py --device cuda \
  --models resnet50,resnet18,vit_b_16 --compile-models resnet50 \
  --json "$out_dir/gpu_bench.json" | tee "$out_dir/gpu_bench.txt"
PYTHONPATH=. python3 - "$out_dir/gpu_bench.json" <<'PY' | tee "$out_dir/gpu_bench.md"
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench_run", "bench/run.py")
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)
print(run.render(json.load(open(sys.argv[1])), markdown=True))
PY
echo "gpu_check took $(( $(date +%s) - start )) s"
