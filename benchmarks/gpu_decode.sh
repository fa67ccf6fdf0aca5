#!/usr/bin/env bash
# One H200, ~7 minutes: decode speed of the engine (benchmarks/decode.py, random bf16 weights)
# at the 8B hybrid, pure Mamba-2 and GPT shapes, contexts 4k and 32k, batches 1/32/64, under
# CUDA graphs, each step launched ahead (overlap); the hybrid also without overlap; the
# Transformer's largest batches at 32k; the first token's latency after a 4k and a 32k prompt (prefill) for
# the hybrid and the Transformer; mamba-ssm's own CUDA-graph decode at the pure Mamba-2 shape,
# and ours with the recurrent state in bf16 as theirs;
# the GPU equality tests of the graph engine, the decode kernels and RMSNorm (tiny models); the
# hybrid at batch 1 eagerly (what the graphs buy). Brings back three files (the device returns
# at most 8): $OUT/summary.txt (the table), $OUT/decode.json (every run's results by name) and
# $OUT/logs.tar.gz (every log). Steps are ordered by priority and skipped once the budget is
# spent (GPU_DECODE_BUDGET_S, default 420 s after set-up). Usage from the repository root, with
# .dev/ and .whl/ carried:
#     OUT=/some/dir bash benchmarks/gpu_decode.sh
set -u
OUT=${OUT:-runs/gpu_decode} START=$(date +%s) W=$(mktemp -d)  # W: each run's JSON and log
mkdir -p "$OUT" && source benchmarks/gpu_setup.sh > "$W/setup.log" 2>&1
echo "set-up $(( $(date +%s) - START )) s"; tail -5 "$W/setup.log"
source benchmarks/gpu_lib.sh
part_budget "${GPU_DECODE_BUDGET_S:-420}"
PART_MIN_S=20 PART_DIR=$W
run() { part "$@"; }  # name timeout_s command...

decode() {  # name timeout_s recipe extra args...: 3 warm-up + 15 timed steps per point
  local name=$1 limit=$2 recipe=$3; shift 3
  run "$name" "$limit" python3 benchmarks/decode.py --recipe "recipes/$recipe.toml" \
    --contexts 4096,32768 --batches 1,32,64 --steps 15 --warmup 3 --device cuda \
    --dtype bfloat16 --json "$W/$name.json" "$@"
}

decode 8b_hybrid 150 8b_hybrid --prefill
# Without launching the next step before the host reads the last one's tokens (the default).
decode 8b_hybrid_no_overlap 120 8b_hybrid --no-overlap
if python3 -c "import pytest" 2> /dev/null; then
  run gpu_tests 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_graph.py \
    tests/test_ssd.py tests/test_checkpoint_sharded.py -k "gpu or cuda"
fi
decode 8b_gpt3 130 8b_gpt3 --prefill
# The Transformer's KV cache fills the GPU at 32k before batch 32: its largest batches there.
decode 8b_gpt3_fit 60 8b_gpt3 --contexts 32768 --batches 4,7
decode 8b_mamba2 150 8b_mamba2 --mamba-ssm-reference
# The recurrent state in bf16, as mamba-ssm's generation keeps it: what large batches gain.
decode 8b_mamba2_bf16_state 90 8b_mamba2 --contexts 4096 --batches 1,64 --ssm-state-dtype bfloat16
decode 8b_hybrid_bf16_state 90 8b_hybrid --batches 64 --ssm-state-dtype bfloat16
run 8b_hybrid_eager 60 python3 benchmarks/decode.py --recipe recipes/8b_hybrid.toml \
  --contexts 4096 --batches 1 --steps 5 --warmup 1 --device cuda --dtype bfloat16 \
  --no-cuda-graphs --json "$W/8b_hybrid_eager.json"
# Where the graphs failed, a few points eagerly: a number rather than none.
for recipe in 8b_hybrid 8b_mamba2 8b_gpt3; do
  if ! grep -q ms_per_step "$W/$recipe.json" 2> /dev/null; then
    run "${recipe}_eager_fallback" 90 python3 benchmarks/decode.py \
      --recipe "recipes/$recipe.toml" --contexts 4096 --batches 1,64 --steps 3 --warmup 1 \
      --device cuda --dtype bfloat16 --no-cuda-graphs --json "$W/${recipe}_eager_fallback.json"
  fi
done

python3 - "$W" "$OUT/decode.json" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, pathlib, sys
runs = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
print(f"{'run':24} {'recipe':12} {'context':>8} {'batch':>6} {'ms/step':>9} {'tokens/s':>10} "
      f"{'weights GB/s':>13} {'of HBM':>6}")
for name, run in runs.items():
    for r in run["results"]:
        head = f"{name:24} {r['recipe']:12} {str(r['context']):>8} {r['batch']:>6}"
        if "error" in r:
            print(f"{head} {r['error'][:100]}")
        elif "prefill_s" in r:
            print(f"{head} first token after {r['prefill_s']:.3f} s "
                  f"({r['prefill_tokens_per_s']:.0f} prompt tokens/s)")
        else:
            roofline = f"{r['of_hbm_roofline']:.1%}" if "of_hbm_roofline" in r else "-"
            print(f"{head} {r['ms_per_step']:9.2f} {r['tokens_per_s']:10.1f} "
                  f"{r['weights_gb_per_s']:13.1f} {roofline:>6}  {r.get('impl', 'ours')}"
                  f" graphs={r.get('cuda_graphs')} overlap={r.get('overlap')}"
                  f" {r.get('cuda_graph_error', '')[:100]}")
EOF
(cd "$W" && tar czf - -- *.log) > "$OUT/logs.tar.gz"
cat "$OUT/summary.txt"
echo "total $(( $(date +%s) - START )) s"
