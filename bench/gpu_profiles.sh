#!/usr/bin/env bash
# The example GPU profiles the planner and simulator can use offline (dejavu/planner/profiles/), measured
# with our engine on one GPU: OPT-1.3B and Llama-1B (fp16, CUDA graphs, microbatch 1-32, prompts of
# 128-1024 tokens, contexts up to 2040) and OPT-66B's shape extrapolated from stages of 1 and 2 layers.
# About 4 minutes on an H100; needs only torch, triton, numpy, pyyaml (matplotlib for the plots).
#
#     bash bench/gpu_profiles.sh [OUT_DIR]       # default: dejavu/planner/profiles
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dejavu/planner/profiles}
mkdir -p "$out"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")  # h100, h200, ...
grid="--device cuda --dtype fp16 --ubatch-size 1,2,4,8,16,32 --input-len 128,512,1024 --context-len 128,1024,2040"
for model in opt-1.3b llama-1b; do
    timeout 150 python3 -m dejavu profile --model "$model" $grid --reps 5 --budget-s 90 --out "$out/$model-$card.json"
done
timeout 120 python3 -m dejavu profile --model opt-66b --device cuda --dtype fp16 --ubatch-size 1,4,16 \
    --input-len 128,512,1024 --context-len 512,1024,2040 --mid-layers 2 --full-model no --reps 3 \
    --out "$out/opt-66b-$card.json"
