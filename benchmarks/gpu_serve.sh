#!/usr/bin/env bash
# The server at the 8B hybrid's size on one H200, over HTTP (benchmarks/serve_load.py): time to
# ready, first vs tenth request, 1/8/32/64 concurrent clients beside the engine's own decode step
# at the same batch, and a 32k-token prompt admitted while 32 streams decode. The 8B checkpoint
# (random bf16 weights, 17 GB) is written once to $GPU_SERVE_CKPT (kept on a warm machine).
# Each part is cut at its own time limit and skipped once GPU_SERVE_BUDGET_S is spent; JSON and
# server logs go to $OUT. `generate` (first, before anything has compiled a Triton kernel on the
# machine): toolkit.inference.generate's first call against its tenth, for the tiny model's
# closing training sample and a greedy run (benchmarks/generate_warm.py): after the trainer's
# set-up (its decode warm-up) and 3 training steps, then in a fresh process warmed as the generate
# CLI does, then in a fresh process not warmed at all. `generate_tests`: generate's GPU tests
# (sampling inside the recorded step, a capture beside a graph in cyclic garbage). Usage from the
# repository root, with .dev/ and .whl/ carried:
#     OUT=/some/dir bash benchmarks/gpu_serve.sh [generate] [generate_tests] [load] [sampling]
#       [waves] [long]
set -u
OUT=${OUT:-runs/gpu_serve}
CKPT=${GPU_SERVE_CKPT:-$HOME/ckpt8b}
PARTS=${*:-generate generate_tests load sampling waves long}
mkdir -p "$OUT"
T0=$(date +%s)
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
echo "set-up $(( $(date +%s) - T0 )) s"; tail -4 "$OUT/setup.log"

source benchmarks/gpu_lib.sh
part_budget "${GPU_SERVE_BUDGET_S:-540}" "$T0"
PART_ONLY=$PARTS PART_EXT=.out
part_done() { echo "== $1 exit $2 in $3 s"; tail -25 "$4"; }

# The trainer's case first: it meets the Triton cache as empty as a first job would.
part generate 180 bash -c 'w="python3 benchmarks/generate_warm.py --recipe recipes/tiny_hybrid.toml
  --device cuda"; $w --train-steps 3 --json "$1/generate.json" &&
  $w --train-steps 0 --warm-up on --json "$1/generate_cli.json" &&
  $w --train-steps 0 --warm-up off --json "$1/generate_cold.json"' generate "$OUT"
part generate_tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_generate.py \
  -k "recorded or garbage or graph"

if [ ! -e "$CKPT/.written" ] && [[ " $PARTS " =~ \ (load|waves|long)\  ]]; then
  t=$(date +%s)
  python3 - "$CKPT" <<'EOF'
import sys

import torch

from toolkit.build import build_model, save_model_checkpoint
from toolkit.config import load_recipe
from toolkit.tokenizer import build_tokenizer

recipe = load_recipe("recipes/8b_hybrid.toml", [])
torch.manual_seed(0)
model = build_model(recipe, build_tokenizer(recipe.data.tokenizer), "cuda", torch.bfloat16)
print(save_model_checkpoint(sys.argv[1], model, recipe))
EOF
  touch "$CKPT/.written"
  echo "8B checkpoint written in $(( $(date +%s) - t )) s"
fi

# Which Triton kernels tune or compile after ready: the server's log says (its stdout). Each
# wave's line "server: ..." gives the engine's steps, host ms per step, prefill share and passes,
# steps to the first token and threads woken per step; "prefill warmed up" in the server log
# how many prefill shapes the warm-up ran.
export TRITON_PRINT_AUTOTUNING=1
SERVE=(python3 benchmarks/serve_load.py --checkpoint "$CKPT" --device cuda --dtype bfloat16)
part load 420 "${SERVE[@]}" --slots 64 --max-len 4096 --clients 1,8,32,64 --waves 1 \
  --distinct 16 --tokens 128 --cancel-tokens 256 --no-check --json "$OUT/load.json" \
  --log "$OUT/load_server.log"
part sampling 120 python3 benchmarks/decode.py --recipe recipes/8b_hybrid.toml --contexts 4096 \
  --batches 32 --slots 64 --device cuda --dtype bfloat16 --json "$OUT/sampling.json" \
  --sampling greedy,temperature,topk,topp,seeded,logprobs
# The largest wave three times: later waves show what the first one paid for first uses.
part waves 200 "${SERVE[@]}" --slots 64 --max-len 4096 --clients 64 --waves 3 --distinct 8 \
  --tokens 128 --cancel-tokens 256 --no-check --no-engine --json "$OUT/waves.json" \
  --log "$OUT/waves_server.log"
part long 200 "${SERVE[@]}" --slots 64 --max-len 33280 --clients 1 --distinct 4 --tokens 32 \
  --long-prompt 32768 --long-streams 32 --max-prefill-tokens 2048 --no-engine --no-check \
  --json "$OUT/long.json" --log "$OUT/long_server.log"
