#!/usr/bin/env bash
# The race against mamba-ssm's MambaLMHeadModel (benchmarks/race_mamba_ssm.py) on one H200, every
# shape of issue 21 item 4 in one call: the 8B Mamba-2 widths eager and compiled, the 800M's
# widths compiled (pure Mamba-2 and the hybrid form), and the 8B hybrid's first mixers (eager and
# compiled). Each race gets its own time limit and the whole stays under GPU_RACE_BUDGET_S
# (default 570 s, counted from the script's start); a race that would start with under 60 s left
# is skipped, and so are the 800M's and the 8B hybrid's on a card under 100 GiB (an H100: theirs
# would run out of memory after compiling). JSON and logs go to $OUT; each race's side-by-side
# table and the GPU's clock and power beside each side's steps (clock_summary.py) are printed and
# kept in $OUT/summary.txt.
# From the repository root, .dev/ and .whl/ carried:
#     GPU_STATE_DIR=/root/gpu OUT=/some/dir bash benchmarks/gpu_race.sh [NAME ...]
set -u
OUT=${OUT:-runs/gpu_race}
mkdir -p "$OUT"
START=$(date +%s)
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1 || { tail "$OUT/setup.log"; exit 1; }
source benchmarks/gpu_lib.sh
inductor_cache  # the compiled blocks of earlier calls, carried in .dev/
clock_log "$OUT/clocks.csv"  # the power cap, beside each side's steps (clock_summary.py)
part_budget "${GPU_RACE_BUDGET_S:-570}" "$START"
PART_ONLY="$*" PART_MIN_S=60
part_done() { { echo "$1 exit $2 in $3 s"; tail -4 "$4"; } | tee -a "$OUT/summary.txt"; }
CARD_GIB=$(card_gib)
race() {  # name limit_s args...
  # Theirs peaks at ~83 GB at the 800M's widths and ~89 GiB at the 8B hybrid's: an H200's.
  case $1 in 800m* | 8b_hybrid*) fits 100 "$1" || return 0 ;; esac
  part "$1" "$2" python3 benchmarks/race_mamba_ssm.py "${@:3}" --json "$OUT/$1.json"
}
race 8b_mamba2 140 --shape 8b-mamba2
race 8b_mamba2_compiled 160 --shape 8b-mamba2 --compile
race 800m_compiled 160 --shape 800m --compile
race 800m_hybrid_compiled 160 --shape 800m --hybrid --compile
race 8b_hybrid 140 --shape 8b-mamba2 --hybrid
# Both sides' blocks compiled, as in the 8B Mamba-2 and 800M rows (eager: 1.04x on 2026-12-03).
race 8b_hybrid_compiled 180 --shape 8b-mamba2 --hybrid --compile
# The same with ours' fastest setting at the 8B Mamba-2 widths (below): the graph, the bf16 cache
# and fp32 weight gradients. Theirs peaks at ~89 GiB here: an H200's.
race 8b_hybrid_compiled_step_graph_bf16_cache_fp32_wgrad 240 --shape 8b-mamba2 --hybrid \
  --compile --step-graph --set train.bf16_weight_cache=true --set train.fp32_weight_grad_gemm=true
# And with the embedding's gradient kept as rows (below).
race 8b_hybrid_compiled_step_graph_bf16_cache_fp32_wgrad_rows 240 --shape 8b-mamba2 --hybrid \
  --compile --step-graph --set train.bf16_weight_cache=true --set train.fp32_weight_grad_gemm=true \
  --set train.row_sparse_embedding_grad=true
# Where each side's step goes (item 4 missed at the 8B widths: the profile that shows why): the
# same races and one more step of each side under torch.profiler, the kernels by family side by
# side in the log and the two kernel tables in $OUT/profile_NAME (trace_summary.py reads them).
# Named, not in the default run: GPU_STATE_DIR=/root/gpu OUT=$OUT bash benchmarks/gpu_race.sh
#   8b_mamba2_compiled_profile 800m_compiled_profile
race 8b_mamba2_compiled_profile 200 --shape 8b-mamba2 --compile --profile "$OUT/profile_8b_mamba2"
race 800m_compiled_profile 200 --shape 800m --compile --profile "$OUT/profile_800m"
# Our side with torch's fused AdamW, as theirs (our default on GPUs is the Triton kernel since
# 2026-12-05: the races above ran with torch's before that): what the kernel is worth.
race 8b_mamba2_compiled_torch_adamw 160 --shape 8b-mamba2 --compile \
  --set 'train.adamw_kernel="torch"'
race 800m_compiled_torch_adamw 160 --shape 800m --compile --set 'train.adamw_kernel="torch"'
# Our whole step as one CUDA graph (toolkit.step_graph, --step-graph): the 800M's widths are
# host-bound (48 blocks, ~3,700 launches a step: 262 ms of GPU work in 361-383 ms on an H100).
race 800m_compiled_step_graph 200 --shape 800m --compile --step-graph
# The loss's log-sum-exp as torch.logsumexp's two passes over a row (TOOLKIT_LSE_CHUNK=0: the
# default chunks since 2026-12-06; an assignment before a function reaches its commands).
TOOLKIT_LSE_CHUNK=0 race 800m_compiled_step_graph_lse0 200 --shape 800m --compile --step-graph
race 8b_mamba2_compiled_step_graph 200 --shape 8b-mamba2 --compile --step-graph
# train.bf16_weight_cache with the Triton AdamW writing the casts: ours casts no weight in the
# step (the forward's cast of each linear's weight, 6 bytes a parameter, becomes the update's
# 2): eager steps and the graph, each beside 8b_mamba2_compiled(_step_graph) in the same call.
race 8b_mamba2_compiled_bf16_cache 160 --shape 8b-mamba2 --compile \
  --set train.bf16_weight_cache=true
race 8b_mamba2_compiled_step_graph_bf16_cache 200 --shape 8b-mamba2 --compile --step-graph \
  --set train.bf16_weight_cache=true
# The graph with no cast of a weight or its gradient left in the step: the update writes the bf16
# copies, the GEMM writes the fp32 weight gradients: 1.194-1.212x on an H100, 1.176x on an H200
# (RESULTS.md 2026-12-06, early morning and morning); with the rows below ours' fastest.
race 8b_mamba2_compiled_step_graph_bf16_cache_fp32_wgrad 200 --shape 8b-mamba2 --compile \
  --step-graph --set train.bf16_weight_cache=true --set train.fp32_weight_grad_gemm=true
# The same with our loss's log-sum-exp as torch.logsumexp's two passes (TOOLKIT_LSE_CHUNK=0): the
# chunks read once are the default since 2026-12-06 (1.54 against 2.82 ms alone on an H100;
# before, these races ran torch.logsumexp, and the chunked ones were named _lse1024).
TOOLKIT_LSE_CHUNK=0 race 8b_mamba2_compiled_step_graph_bf16_cache_fp32_wgrad_lse0 200 \
  --shape 8b-mamba2 --compile --step-graph --set train.bf16_weight_cache=true \
  --set train.fp32_weight_grad_gemm=true
# The same with the input embedding's gradient kept as the micro-batch's rows, never a whole
# table (train.row_sparse_embedding_grad: ~12 bytes a parameter of the 1.05B table's fill, norm
# read and update read, ~2.9 ms expected on an H200; 3.5 ms measured on an H100).
race 8b_mamba2_compiled_step_graph_bf16_cache_fp32_wgrad_rows 200 --shape 8b-mamba2 --compile \
  --step-graph --set train.bf16_weight_cache=true --set train.fp32_weight_grad_gemm=true \
  --set train.row_sparse_embedding_grad=true
# The same with our causal conv in Triton inside our fused op (model.mamba_conv_backend): theirs
# runs causal-conv1d's in mamba-ssm's op, as ours did.
race 8b_mamba2_compiled_step_graph_bf16_cache_fp32_wgrad_rows_triton_conv 200 --shape 8b-mamba2 \
  --compile --step-graph --set train.bf16_weight_cache=true --set train.fp32_weight_grad_gemm=true \
  --set train.row_sparse_embedding_grad=true --set 'model.mamba_conv_backend="triton"'
# And keeping the conv's output and the SSD's states for the backward (model.mamba_recompute).
race 8b_mamba2_compiled_step_graph_bf16_cache_fp32_wgrad_rows_keep 200 --shape 8b-mamba2 \
  --compile --step-graph --set train.bf16_weight_cache=true --set train.fp32_weight_grad_gemm=true \
  --set train.row_sparse_embedding_grad=true --set model.mamba_recompute=false
# train.fp32_weight_grad_gemm: the weight gradients written in fp32 by the GEMM (the bf16
# product's cast and layout pass gone: ~1.8 ms a step in the layers and ~1.2 ms for the output
# layer in the afternoon profile, H100), alone and with the update's bf16 casts, eager steps.
race 8b_mamba2_compiled_fp32_wgrad 160 --shape 8b-mamba2 --compile \
  --set train.fp32_weight_grad_gemm=true
race 8b_mamba2_compiled_bf16_cache_fp32_wgrad 160 --shape 8b-mamba2 --compile \
  --set train.bf16_weight_cache=true --set train.fp32_weight_grad_gemm=true
clock_log_stop
python3 benchmarks/clock_summary.py "$OUT/clocks.csv" "$OUT"/*.json | tee -a "$OUT/summary.txt"
echo "total $(( $(date +%s) - START )) s"
