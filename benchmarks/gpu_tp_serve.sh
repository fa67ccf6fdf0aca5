#!/usr/bin/env bash
# Two H200s (kind nvidia-h200-x2), ~9 minutes: tensor-parallel serving over NCCL. The 8B hybrid
# (random bf16 weights) served by `serve.py --tp 2` against `--tp 1`: the same greedy texts, and
# tokens/s at batch 1 and 8 (benchmarks/tp_serve.py): both on CUDA graphs (--tp-cuda-graphs:
# NCCL collectives inside the graphs), then TP eager against one GPU on graphs, then both eager.
# Brings back $OUT/tp_{tp_graphs,graphs,eager}.json and their logs.
# Usage from the repository root, with .dev/ and .whl/ carried:
#     OUT=/some/dir bash benchmarks/gpu_tp_serve.sh
set -u
OUT=${OUT:-runs/gpu_tp_serve}
mkdir -p "$OUT"
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
tail -5 "$OUT/setup.log"
for mode in tp_graphs graphs eager; do
  extra=()
  [ "$mode" = eager ] && extra=(--no-cuda-graphs)
  [ "$mode" = tp_graphs ] && extra=(--tp-cuda-graphs)
  timeout 200 python3 benchmarks/tp_serve.py --recipe recipes/8b_hybrid.toml --tp 2 \
    --device cuda --dtype bfloat16 --tokens 64 --batches 1,8 --json "$OUT/tp_$mode.json" \
    --checkpoint-dir /tmp/tp_serve_8b "${extra[@]}" > "$OUT/tp_$mode.log" 2>&1
  echo "tp_serve $mode exit $?"; tail -6 "$OUT/tp_$mode.log"
done
