#!/usr/bin/env bash
# One H200, ~9 minutes: training throughput of the 800M hybrid at seq 4096 (bf16; bf16 with
# per-block torch.compile; bigger micro-batches with and without activation checkpointing; float8
# through torchao, compiled, tensorwise and rowwise), bf16 against float8 at the 8B hybrid's
# shapes (half of its layers), and the GPU-vs-CPU parity check. Each measurement's JSON
# (benchmarks/train_throughput.py, gpu_parity.py) and log go into $OUT/runs.tar.gz;
# $OUT/summary.txt is the table; $OUT/inductor.tar.xz.part* the compiled blocks (carry them in
# .dev/ next time). Runs are ordered by priority and skipped once the time budget is spent
# (GPU_TRAIN_BUDGET_S, default 500 s after set-up). GPU_TRAIN_RUNS="name ..." runs only those.
# Usage from the repository root, with .dev/ and .whl/ carried:
#     OUT=/some/dir bash benchmarks/gpu_train.sh
# The training-step levers (train.flat_optimizer, train.compile_scope, train.compile_mode), each
# alone against the 800M's best setting in one run (~8 minutes with warm caches):
#     GPU_STATE_DIR=/root/gpu GPU_TRAIN_RUNS="bf16_compile_mbs8 opt_step lever_flat_optimizer
#       8b28l_bf16_compile lever_8b28l_flat_optimizer lever_compile_model lever_flat_compile_model lever_autotune" OUT=$OUT \
#       GPU_TRAIN_BUDGET_S=500 bash benchmarks/gpu_train.sh
# The recipes' global batches, micro-batches accumulated (8B: 8 of 1 sequence, 800M: 4 of 8):
#     GPU_STATE_DIR=/root/gpu GPU_TRAIN_RUNS="8b28l_bf16_compile 8b28l_bf16_compile_gb8
#       8b28l_fp8_compile_gb8 8b28l_fp8_all_compile 8b28l_fp8_all_compile_gb8 bf16_compile_mbs8_gb32
#       fp8_compile_mbs8_gb32" OUT=$OUT bash benchmarks/gpu_train.sh
# The compiled blocks as CUDA graphs, each beside the same without (issue 21's gaps):
#     GPU_TRAIN_RUNS="8b28l_bf16_compile_gb8 8b28l_bf16_cudagraphs_gb8
#       8b28l_fp8_all_compile_gb8 8b28l_fp8_all_cudagraphs_gb8 bf16_compile_mbs8
#       bf16_cudagraphs_mbs8" OUT=$OUT bash benchmarks/gpu_train.sh
# The SSD's chunk length, the kernels alone and whole steps (800M and the 8B's shapes):
#     GPU_TRAIN_RUNS="ssd_chunks bf16_compile_mbs8 lever_chunk256 8b28l_bf16_compile_gb8
#       8b28l_bf16_chunk256_gb8" OUT=$OUT bash benchmarks/gpu_train.sh
# Weight gradients added into .grad in the backward, beside the same without (~6 minutes), and
# the cached float8 linears casting their input again in the backward (torchao's way):
#     GPU_STATE_DIR=/root/gpu GPU_TRAIN_RUNS="8b28l_bf16_compile_gb8 8b28l_bf16_fga_gb8
#       8b28l_fp8_all_cache_compile_gb8 8b28l_fp8_all_cache_fga_gb8
#       8b28l_fp8_all_cache_recast_fga_gb8" OUT=$OUT bash benchmarks/gpu_train.sh
# The float8 weights' once-a-step cast alone (cast_all against a cast per layer), then FP8 with
# the cache against bf16, both with the fused accumulation (issue 21 item 3; ~8 minutes):
#     GPU_STATE_DIR=/root/gpu GPU_TRAIN_RUNS="fp8_weight_cast 8b28l_bf16_fga_gb8
#       8b28l_fp8_all_cache_fga_gb8" OUT=$OUT bash benchmarks/gpu_train.sh
# Inductor's kernels tuned (train.compile_mode="coordinate-descent-tuning") at the 8B's shapes
# and the 800M, each beside the same without:
#     GPU_STATE_DIR=/root/gpu GPU_TRAIN_RUNS="8b28l_bf16_fga_gb8 8b28l_bf16_fga_cdt_gb8
#       8b28l_fp8_all_cache_fga_gb8 8b28l_fp8_all_cache_fga_cdt_gb8 bf16_compile_mbs8
#       bf16_cdt_mbs8" OUT=$OUT bash benchmarks/gpu_train.sh
# On an H100 (80 GB) the same A/B at 14 of the 8B's layers, with the cast alone (22 GB):
#     GPU_STATE_DIR=/root/gpu GPU_TRAIN_RUNS="fp8_weight_cast 8b14l_fp8_all_cache_fga_gb8
#       8b14l_fp8_all_cache_fga_cdt_gb8 8b14l_bf16_fga_gb8" OUT=$OUT bash benchmarks/gpu_train.sh
# The bf16 weights cast once a step (train.bf16_weight_cache), each beside the same without:
#     GPU_STATE_DIR=/root/gpu GPU_TRAIN_RUNS="bf16_cache_gpu_test 8b28l_bf16_fga_gb8
#       8b28l_bf16_fga_cache_gb8 bf16_fga_mbs8_gb32 bf16_fga_cache_mbs8_gb32" OUT=$OUT bash
#       benchmarks/gpu_train.sh
#   (on an H100: 8b14l_bf16_fga_gb8 8b14l_bf16_fga_cache_gb8)
# The same at the 800M's global batch (4 micro-batches of 8):
#     GPU_TRAIN_RUNS="bf16_compile_mbs8_gb32 bf16_fga_mbs8_gb32" OUT=$OUT bash benchmarks/gpu_train.sh
# FP8 with the weights cast once per update, beside the same without (~5 minutes, cold caches):
#     GPU_TRAIN_RUNS="8b28l_bf16_compile_gb8 8b28l_fp8_all_compile_gb8
#       8b28l_fp8_all_cache_compile_gb8 8b28l_fp8_all_compile 8b28l_fp8_all_cache_compile"
#       OUT=$OUT bash benchmarks/gpu_train.sh
# What the latest RESULTS.md entry queues, on whichever card comes (see GPU_TRAIN_RUNS=next below):
#     GPU_TRAIN_RUNS=next GPU_STATE_DIR=/root/gpu GPU_TRAIN_BUDGET_S=$((470 - SECONDS)) OUT=$OUT \
#       bash benchmarks/gpu_train.sh
# GPU_STATE_DIR, if set, becomes .gpu (installs, Triton and Inductor caches: kept while the
# machine is).
set -u
if [ -n "${GPU_STATE_DIR:-}" ] && [ ! -L .gpu ]; then
  mkdir -p "$GPU_STATE_DIR" && rm -rf .gpu && ln -s "$GPU_STATE_DIR" .gpu
fi
OUT=${OUT:-runs/gpu_train}
W=$(mktemp -d)  # each run's JSON and log; $OUT gets the summary and one archive of them
mkdir -p "$OUT"
START=$(date +%s)
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
source benchmarks/gpu_lib.sh
echo "set-up $(( $(date +%s) - START )) s, tree $(tree_digest)"; tail -5 "$OUT/setup.log"
# Later processes (and, carried back in .dev/, later calls) reuse the compiled blocks.
inductor_cache
clock_log "$W/clocks.csv"  # the power cap beside each run's timed steps (clock_summary.py)
part_budget "${GPU_TRAIN_BUDGET_S:-500}"
# GPU_TRAIN_RUNS=next: what RESULTS.md's latest entry queues, for whichever card came (a call
# asking for any card is then never wasted): on an H200 issue 21's item 1 (the 800M's fastest
# setting at micro-batch 8, at the recipe's global batch and alone, one step traced) and the
# conv's backward-alone stream at the global batch; elsewhere that stream's step A/B and
# Inductor's tuned kernels at micro-batch 4 (H200: ~5 minutes with set-up, H100 ~6).
if [ "${GPU_TRAIN_RUNS:-}" = next ]; then
  GPU_TRAIN_RUNS=$(by_card "lever_fastest_no_recompute_gb32 lever_fastest_no_recompute
    lever_fastest_no_recompute_traced lever_fastest_no_recompute_conv_t2_gb32" \
    "lever_fastest_no_recompute_mbs4 lever_fastest_no_recompute_mbs4_gb32
    lever_fastest_no_recompute_conv_t2_mbs4 lever_fastest_no_recompute_conv_t2_mbs4_gb32
    lever_fastest_no_recompute_cdt_mbs4")
  GPU_TRAIN_RUNS=$(echo $GPU_TRAIN_RUNS)  # one line
  echo "next, on $(card_name): $GPU_TRAIN_RUNS"
fi
PART_ONLY=${GPU_TRAIN_RUNS:-} PART_DIR=$W
run() { part "$@"; }  # name timeout_s command...
# train.fused_grad_accumulation is on by default since 2026-12-05: the runs leave it off unless
# their name says fga (their extra --set comes later and wins), so a name means what it meant
# in the RESULTS.md entries before.
NO_FGA=(--set train.fused_grad_accumulation=false)
# Likewise model.mamba_recompute, off in the 800M recipe since 2026-12-06 afternoon: on in the
# runs unless their name says no_recompute.
# (Since 2026-12-06 evening the kept states' backward takes our state-gradient kernel by default,
# since 2026-12-07 morning also our chunk-state kernel: TOOLKIT_TRITON_MAMBA=none in front of a
# run for mamba-ssm's kernels alone, =dstates for the default before.)
RECOMPUTE=(--set model.mamba_recompute=true)
# The FP8 runs' best setting (every linear in float8, the weights cast once a step, the weight
# gradients added into .grad), and Inductor's kernels tuned: the A/B runs below share them.
FP8_CACHE_FGA=(--set 'train.precision="fp8"' --set train.compile=true --set 'train.fp8_layers="all"'
  --set train.fp8_weight_cache=true --set train.fused_grad_accumulation=true)
CDT=(--set 'train.compile_mode="coordinate-descent-tuning"')
# The 800M's fastest setting (the 8B race's, RESULTS.md 2026-12-06): the graph, the bf16 weight
# cache, fp32 weight gradients from the GEMM and the embedding's gradient as rows (these need
# fused gradient accumulation); the lever_fastest runs share it.
FASTEST=(--set train.compile=true --step-graph --set train.fused_grad_accumulation=true
  --set train.bf16_weight_cache=true --set train.fp32_weight_grad_gemm=true
  --set train.row_sparse_embedding_grad=true)
FASTEST_KEPT=("${FASTEST[@]}" --set model.mamba_recompute=false)  # and the states kept

tp() {  # name timeout_s mbs extra args...: 800M at seq 4096, 3 warm-up + 10 timed steps
  local name=$1 limit=$2 mbs=$3; shift 3
  run "$name" "$limit" python3 benchmarks/train_throughput.py recipes/800m_hybrid.toml \
    --seq 4096 --mbs "$mbs" --warmup 3 --steps 10 --set 'train.device="cuda"' \
    --json "$W/$name.json" "${NO_FGA[@]}" "${RECOMPUTE[@]}" "$@"
}

tp_traced() {  # name timeout_s mbs extra args...: tp's run with one more step traced after the
  # timed ones (train_throughput.py --profile), summed by trace_summary.py into $W/NAME.trace.txt
  # and its kernel table into $W/NAME.kernels; the trace itself (tens of MB) stays on the machine
  local name=$1 trace=/tmp/gpu_traces/$1.json
  tp "$@" --profile "$trace"
  if [ "$PART_RAN" = 1 ] && [ -e "$trace" ]; then
    timeout 120 python3 benchmarks/trace_summary.py "$trace" --top 40 \
      --json-out "$W/$name.kernels" > "$W/$name.trace.txt" 2>&1
  fi
}

tp_sizes() {  # timeout_s name extra args...: NAME at micro-batch 4 (_mbs4) and 8, each alone
  # (timeout_s) and at the recipe's global batch of 32 (_gb32), in the fastest setting with the
  # states kept (FASTEST_KEPT); the caller's environment goes with each run
  local limit=$1 name=$2; shift 2
  tp "${name}_mbs4" "$limit" 4 "${FASTEST_KEPT[@]}" "$@"
  tp "$name" "$limit" 8 "${FASTEST_KEPT[@]}" "$@"
  tp "${name}_mbs4_gb32" 300 4 --accumulate 8 "${FASTEST_KEPT[@]}" "$@"
  tp "${name}_gb32" 300 8 --accumulate 4 "${FASTEST_KEPT[@]}" "$@"
}

t8b() {  # name timeout_s layers extra args...: the 8B hybrid's shapes (hidden 4096, FFN 16384,
  # vocab 256k) with fewer of its 56 layers in the same mix, to fit one GPU (28 do)
  local name=$1 limit=$2 layers=$3; shift 3
  run "$name" "$limit" python3 benchmarks/train_throughput.py recipes/8b_hybrid.toml \
    --seq 4096 --mbs 1 --warmup 3 --steps 10 --set 'train.device="cuda"' \
    --set "model.num_layers=$layers" --json "$W/$name.json" "${NO_FGA[@]}" "$@"
}

# Ordered by what is least known (2026-11-29 morning: the 800M at micro-batch 4 and 8, eager and
# compiled, full activation checkpointing, and bf16 vs FP8 at 14 and 28 of the 8B's layers were
# measured; FP8 gave 1.04x and 1.12x). The parity check first: it runs the compiled cross-entropy
# kernels (new on 2026-11-29 noon) against the CPU. 300 s: on a fresh machine (cold Triton and
# Inductor caches) the fp32 half alone took most of 150 s (2026-12-05), the bf16 half and the
# 50-step curve were cut off.
run parity 300 python3 benchmarks/gpu_parity.py --json "$W/parity.json"
# bf16 against FP8 at 28 of the 8B layers with the new cross-entropy; FP8 rowwise; the 800M with
# FP8 at its best micro-batch; checkpointing of the Mamba blocks only.
t8b 8b28l_bf16_compile 200 28 --set train.compile=true
t8b 8b28l_fp8_compile 150 28 --set 'train.precision="fp8"' \
  --set train.compile=true
t8b 8b28l_fp8_rowwise_compile 150 28 --set 'train.precision="fp8"' \
  --set train.compile=true --set 'train.fp8_recipe="rowwise"'
tp fp8_compile_mbs8 150 8 --set 'train.precision="fp8"' --set train.compile=true
tp bf16_compile_mbs8_ac_mamba 120 8 --set train.compile=true \
  --set 'train.activation_checkpointing=["mamba"]'
tp bf16_compile_mbs12_ac_mamba 120 12 --set train.compile=true \
  --set 'train.activation_checkpointing=["mamba"]'
# The 800M's best setting and the eager baseline, measured before (re-run after changes).
# 200 s: a cold Inductor cache takes ~120 s to compile the blocks (carry .dev/inductor.tar.xz.part*).
tp bf16_compile_mbs8 200 8 --set train.compile=true
# The loss's log-sum-exp read once a row (TOOLKIT_LSE_CHUNK, toolkit/loss.py; 1024, the default
# since 2026-12-06): the 800M's 32k rows of 256k logits a step, ~4 ms of a two-pass forward by
# bandwidth; lever_lse0 is torch.logsumexp's two passes, against bf16_compile_mbs8.
TOOLKIT_LSE_CHUNK=0 tp lever_lse0 200 8 --set train.compile=true
# The training-step levers, each alone against bf16_compile_mbs8 (issue 21): the optimizer step
# alone (torch's fused AdamW against the flat one, and their agreement on the GPU), then whole
# steps with AdamW over flat buffers, the whole model as one compiled region (graph breaks and
# recompiles logged), flat buffers with the whole-model region, and (last: minutes of
# autotuning when its caches are cold) inductor's max-autotune.
run opt_step 120 python3 benchmarks/optimizer_step.py recipes/800m_hybrid.toml \
  --set 'train.device="cuda"' --steps 20 --json "$W/opt_step.json"
# train.fp8_weight_cache's once-a-step cast alone at the 8B's shapes (28 layers, 4.3B float8
# weights, ~22 GB): cast_all (one multi-tensor amax pass, one pass a weight for both layouts)
# against a compiled cast and column-major copy per layer; the same bits checked.
run fp8_weight_cast 150 python3 benchmarks/fp8_weight_cast.py recipes/8b_hybrid.toml \
  --set model.num_layers=28 --json "$W/fp8_weight_cast.json"
# The same at the 8B's shapes (28 layers, 5.4B parameters; one variant at a time, ~108 GB).
run opt_step_8b28l 150 python3 benchmarks/optimizer_step.py recipes/8b_hybrid.toml \
  --set 'train.device="cuda"' --set model.num_layers=28 --steps 5 --warmup 2 \
  --variants torch,flat,flat_clip_in_place --json "$W/opt_step_8b28l.json"
tp lever_flat_optimizer 120 8 --set train.compile=true --set train.flat_optimizer=true
# train.adamw_kernel: one Triton kernel over every parameter, the clip folded in (the default on
# GPUs since 2026-12-05, "auto"; runs before that took torch's), the update alone against
# torch's fused AdamW clipped in place, then whole steps with torch's against
# bf16_compile_mbs8 (the 800M) and 8b28l_bf16_compile_gb8 (the 8B's shapes).
run opt_step_triton 120 python3 benchmarks/optimizer_step.py recipes/800m_hybrid.toml \
  --set 'train.device="cuda"' --steps 20 --variants torch,triton --json "$W/opt_step_triton.json"
tp lever_torch_adamw 200 8 --set train.compile=true --set 'train.adamw_kernel="torch"'
# The Triton AdamW's shape swept (the update alone, 800M): smaller blocks (more programs resident
# on an SM), SPAN blocks a program with the next block's loads before a block's stores, and
# evict-first accesses; torch's fused AdamW and the default kernel beside them. Whether the
# kernel waits on latency rather than bandwidth: its time should then hardly differ between an
# H100 and an H200 (the 8B widths' step did not, 2026-12-05).
run opt_step_sweep 150 python3 benchmarks/optimizer_step.py recipes/800m_hybrid.toml \
  --set 'train.device="cuda"' --steps 20 --json "$W/opt_step_sweep.json" --variants \
  torch,triton,triton_b2048_w8,triton_b1024_w8,triton_b1024_w4,triton_b4096_w8_stream,\
triton_b4096_w8_x4,triton_b2048_w8_x4,triton_b1024_w8_x8,triton_b1024_w8_x8_stream,\
triton_b1024_w4_x8,triton_b2048_w4_x4
# The whole step as one CUDA graph (toolkit.step_graph) against bf16_compile_mbs8: what the host's
# time to queue the 800M's launches costs.
run step_graph_gpu_test 300 python3 -m pytest -q tests/test_step_graph.py
tp lever_step_graph 200 8 --set train.compile=true --step-graph
# train.row_sparse_embedding_grad on the GPU: the kernel's gather, and training with the key
# against without, eager and through a real CUDA graph of the step (tests/test_row_sparse_grad.py).
run row_sparse_gpu_test 240 python3 -m pytest -q tests/test_row_sparse_grad.py -k on_gpu
# Our causal conv in Triton inside our fused op (model.mamba_conv_backend, conv_kernel.py)
# against causal-conv1d's three passes a layer in mamba-ssm's (17.6 ms of the 800M's step on
# 2026-11-29): the kernels alone, then whole steps against bf16_compile_mbs8.
run conv_gpu_test 300 python3 -m pytest -q tests/test_conv_kernel.py
run conv_kernel 120 python3 benchmarks/conv_kernel.py --json "$W/conv_kernel.json" \
  --variants default,s3,g8,g8_s3,g16_r1024,g16_r1024_s3,g32_s3
# Both passes a row at a time (conv_kernel.STREAM: no ring, no barrier; ~1.3 TB/s for
# causal-conv1d's backward, 0.61-0.65 ms a layer at micro-batch 8 on an H100), at micro-batch 4
# and 8, by runs of rows a program (p: side by side in one tile), rows a run, channels, warps
# (~8 of a tile's elements a thread) and stages; t2 the backward alone beside the tiled forward
# (as fast as causal-conv1d's; the fused op runs it twice a layer, its backward once). On an
# H100 (2026-12-07 21:25-23:00) none beat causal-conv1d's layer: t2_h512 0.669 against 0.645
# ms at micro-batch 4; rows asked of the L2 ahead were slower (removed).
STREAM_VARIANTS=t1_h512,t1_p2_q128_h512,t1_p4_q64_h256,t2_h512,t2_h256,t2_p2_q128_h512
STREAM_VARIANTS+=,t2_p4_q64_h256,t2_h1024_w8
run conv_stream 200 python3 benchmarks/conv_kernel.py --json "$W/conv_stream.json" \
  --variants "default,$STREAM_VARIANTS"
run conv_stream_mbs4 200 python3 benchmarks/conv_kernel.py --batch 4 \
  --json "$W/conv_stream_mbs4.json" --variants "default,$STREAM_VARIANTS"
tp lever_triton_conv 200 8 --set train.compile=true --set 'model.mamba_conv_backend="triton"'
# Our gated RMSNorm in Triton (gated_norm_kernel.py; mamba-ssm's backward took ~2.5x its bytes'
# time at the 800M's widths): compiled against the torch norm and mamba-ssm's, then both timed.
run gated_norm_gpu_test 200 python3 -m pytest -q tests/test_gated_norm_kernel.py
run gated_norm 120 python3 benchmarks/gated_norm.py --json "$W/gated_norm.json"
run gated_norm_sweep 200 python3 benchmarks/gated_norm.py --sweep --json "$W/gated_norm_sweep.json"
# The 800M's attention (16 heads, 8 key groups, 64 channels a head, causal) by each SDPA
# backend, the groups as the model passes them and repeated to every head (5.7 ms a micro-batch-4
# step in the 2026-12-07 profile: ~340 TFLOP/s), at micro-batch 4 and 8.
run attention_backends_mbs4 120 python3 benchmarks/attention_backends.py --batch 4 \
  --json "$W/attention_backends_mbs4.json"
run attention_backends 120 python3 benchmarks/attention_backends.py --json "$W/attention_backends.json"
# Our SSD forward as one kernel carrying the states through the chunks (ssd_scan_kernel.py;
# mamba-ssm's SSD ran at a tenth of the HBM's bandwidth by its bytes): against the reference and
# mamba-ssm's kernels (with its backward from either's kept states), then timed at the 800M's
# and the 8B's Mamba widths at channels a program x output rows a step x warps.
run ssd_forward_gpu_test 240 python3 -m pytest -q tests/test_ssd_scan_kernel.py
run ssd_forward 150 python3 benchmarks/gpu_kernels.py --fused-forward \
  p64_w8,p64_m16_w8,p64_m64_w8,p64_w4,p32_w8
# Our chunk states in one kernel (ssd_states_kernel.py: mamba-ssm's cumsum, chunk state and
# state passing, the states carried in registers): against the reference and mamba-ssm's three
# kernels, then timed at the 800M's and the 8B's widths at channels a program x warps x stages.
run states_gpu_test 200 python3 -m pytest -q tests/test_ssd_states_kernel.py
run ssd_states 120 python3 benchmarks/gpu_kernels.py --states \
  p32_w4_s2,p32_w4_s1,p64_w4_s2,p64_w8_s2,p16_w4_s2,p32_w8_s3
# Our chunk-state gradients in one kernel carrying them back through the chunks
# (ssd_state_grad_kernel.py): against autograd and mamba-ssm's two kernels, then timed.
run state_grad_gpu_test 200 python3 -m pytest -q tests/test_ssd_state_grad_kernel.py
run state_grads 120 python3 benchmarks/gpu_kernels.py --state-grads \
  p64_n64_w4,p64_n64_q32_w4,p64_n64_q64_w4,p64_n64_q32_w8,p32_n32_q32_w4
# The backward's other gradients in a per-head kernel and dC's and dB's (ssd_chunk_grad_kernel.py):
# against autograd and mamba-ssm's backward, then the whole SSD backward timed with each set of
# our kernels and settings (m/w: the head kernel's rows a step and warps; r/v: the B/C
# kernels' rows a program and warps), each kernel's time from torch.profiler beside it.
run chunk_grad_gpu_test 200 python3 -m pytest -q tests/test_ssd_chunk_grad_kernel.py
run ssd_backward 200 python3 benchmarks/gpu_kernels.py --backward \
  dstates,dstates+dx,dstates+bc@v4,dstates+bc,dstates+bc+ddacs
# The default's B/C kernels (with dA's rows and the dt kernel) at other settings (s: stages,
# now 1), from fp32 kept states (_fp32states: TOOLKIT_MAMBA_LOWP_STATES=0) and bf16 ones (the
# default since 2026-12-07 late night; bc_sweep_lowp in that entry).
BC_SWEEP=dstates+bc+dt,dstates+bc+dt@s2,dstates+bc+dt@v4_s2,dstates+bc+dt@r32_v4_s2
BC_SWEEP+=,dstates+bc+dt@r128_v16,dstates+bc+dt@r128_v8_s2
TOOLKIT_MAMBA_LOWP_STATES=0 run bc_sweep_fp32states 200 python3 benchmarks/gpu_kernels.py \
  --backward "$BC_SWEEP"
run bc_sweep 200 python3 benchmarks/gpu_kernels.py --backward "$BC_SWEEP"
# All of them in the fused op (TOOLKIT_TRITON_MAMBA, fused_mamba.py): the op against mamba-ssm's
# own, then (below) whole steps against lever_no_recompute_mbs4 / lever_no_recompute.
TOOLKIT_TRITON_MAMBA=norm,forward,dstates,dx run triton_mamba_gpu_test 240 python3 -m pytest -q \
  tests/test_conv_kernel.py -k fused_op_matches
# The 800M recipe with the fastest setting (FASTEST), against bf16_compile_mbs8 and
# lever_step_graph.
tp lever_fastest 200 8 "${FASTEST[@]}"
t8b lever_8b28l_step_graph_gb8 300 28 --accumulate 8 --set train.compile=true --step-graph
# The fused Mamba op keeping the conv's output and the SSD's chunk states for the backward
# instead of recomputing them (model.mamba_recompute=false, fused_mamba.py: 4 kernels a layer
# fewer, 16 KB a token a layer more): against bf16_compile_mbs8, and at micro-batch 4 (an H100's
# size) against bf16_compile_mbs4; then with lever_fastest's setting.
tp lever_no_recompute 200 8 --set train.compile=true --set model.mamba_recompute=false
TOOLKIT_TRITON_MAMBA=none tp lever_no_recompute_mamba 200 8 --set train.compile=true \
  --set model.mamba_recompute=false
tp bf16_compile_mbs4 200 4 --set train.compile=true
tp lever_no_recompute_mbs4 200 4 --set train.compile=true --set model.mamba_recompute=false
TOOLKIT_TRITON_MAMBA=none tp lever_no_recompute_mamba_mbs4 200 4 --set train.compile=true \
  --set model.mamba_recompute=false
TOOLKIT_TRITON_MAMBA=dstates,dx tp lever_no_recompute_dx_mbs4 200 4 --set train.compile=true \
  --set model.mamba_recompute=false
TOOLKIT_TRITON_MAMBA=dstates,dx tp lever_no_recompute_dx 200 8 --set train.compile=true \
  --set model.mamba_recompute=false
# (the kernels' steps, after their baselines above so a cut call still has those; each names the
# default's dstates too, so that it differs from lever_no_recompute(_mbs4) by its own kernels)
TOOLKIT_TRITON_MAMBA=norm,dstates tp lever_no_recompute_norm_mbs4 200 4 --set train.compile=true \
  --set model.mamba_recompute=false
TOOLKIT_TRITON_MAMBA=norm,forward,dstates tp lever_no_recompute_norm_forward_mbs4 200 4 \
  --set train.compile=true --set model.mamba_recompute=false
TOOLKIT_TRITON_MAMBA=norm,forward,dstates tp lever_no_recompute_norm_forward 200 8 \
  --set train.compile=true --set model.mamba_recompute=false
TOOLKIT_TRITON_MAMBA=norm,dstates,dx tp lever_no_recompute_ours_mbs4 200 4 \
  --set train.compile=true --set model.mamba_recompute=false
TOOLKIT_TRITON_MAMBA=norm,dstates,dx tp lever_no_recompute_ours 200 8 \
  --set train.compile=true --set model.mamba_recompute=false
tp lever_fastest_no_recompute 200 8 "${FASTEST_KEPT[@]}"
# And at the recipe's global batch (32 sequences: 4 micro-batches of 8 a step on one GPU).
tp lever_fastest_no_recompute_gb32 300 8 --accumulate 4 "${FASTEST_KEPT[@]}"
# Where its step goes (issue 21 item 1's profile): the same, one more step traced.
tp_traced lever_fastest_no_recompute_traced 240 8 "${FASTEST_KEPT[@]}"
# The same two at micro-batch 4 (an H100's size: 8 micro-batches a global batch), against
# lever_no_recompute_mbs4.
tp lever_fastest_no_recompute_mbs4 200 4 "${FASTEST_KEPT[@]}"
tp lever_fastest_no_recompute_mbs4_gb32 300 4 --accumulate 8 "${FASTEST_KEPT[@]}"
tp_traced lever_fastest_no_recompute_mbs4_traced 240 4 "${FASTEST_KEPT[@]}"
# fused_mamba.DEFAULT_TRITON_MAMBA, read from the source (a copy here would go stale)
DEFAULT_OURS=$(sed -n 's/^DEFAULT_TRITON_MAMBA = "\(.*\)"$/\1/p' toolkit/model/fused_mamba.py)
: "${DEFAULT_OURS:?DEFAULT_TRITON_MAMBA not found in toolkit/model/fused_mamba.py}"
without() {  # the default's names less those given: without norm dt
  local names=",$DEFAULT_OURS," name
  for name in "$@"; do names=${names/,$name,/,}; done
  names=${names#,}; echo "${names%,}"
}
# Our gated norm (TOOLKIT_TRITON_MAMBA's norm) and dA's rows summed into dt's gradient by one
# kernel (dt: ssd_chunk_grad_kernel.ssd_dt_grads, in place of torch's flips, cumulative sums and
# adds and mamba-ssm's _chunk_cumsum_bwd: ~10 launches a Mamba layer), defaults since
# 2026-12-07 night: the default less each and less both (the default before), against
# lever_fastest_no_recompute(_mbs4)(_gb32) and _mbs4_gb32 in the same call.
for less in norm dt norm,dt; do
  TOOLKIT_TRITON_MAMBA=$(without ${less/,/ }) tp_sizes 200 \
    "lever_fastest_no_recompute_no${less/,/_no}"
done
# Our chunk-state kernel beside the state gradients' (the default's parts since 2026-12-07
# morning), in the fastest setting against lever_fastest_no_recompute_dstates(_mbs4).
TOOLKIT_TRITON_MAMBA=states,dstates tp lever_fastest_no_recompute_states_mbs4 200 4 \
  "${FASTEST_KEPT[@]}"
TOOLKIT_TRITON_MAMBA=states,dstates tp lever_fastest_no_recompute_states 200 8 "${FASTEST_KEPT[@]}"
# B's and C's gradients by our two kernels, x's and dA's within the chunks by mamba-ssm's two
# (TOOLKIT_TRITON_MAMBA's bc, likewise), against the same.
TOOLKIT_TRITON_MAMBA=bc,dstates tp lever_fastest_no_recompute_bc_mbs4 200 4 "${FASTEST_KEPT[@]}"
TOOLKIT_TRITON_MAMBA=bc,dstates tp lever_fastest_no_recompute_bc 200 8 "${FASTEST_KEPT[@]}"
# The RMSNorms writing the residual stream's fp32 (TOOLKIT_NORM_AUTOCAST_OUTPUT=0: as before
# 2026-12-07 noon; their readers' linears then cast), against
# lever_fastest_no_recompute(_mbs4), where they write bf16.
TOOLKIT_NORM_AUTOCAST_OUTPUT=0 tp lever_fastest_no_recompute_fp32norm_mbs4 200 4 \
  "${FASTEST_KEPT[@]}"
TOOLKIT_NORM_AUTOCAST_OUTPUT=0 tp lever_fastest_no_recompute_fp32norm 200 8 "${FASTEST_KEPT[@]}"
# C Bt made again in the backward (TOOLKIT_MAMBA_KEEP_CB=0: as before 2026-12-07 afternoon),
# against lever_fastest_no_recompute(_mbs4), where the forward's is kept.
TOOLKIT_MAMBA_KEEP_CB=0 tp lever_fastest_no_recompute_nocb_mbs4 200 4 "${FASTEST_KEPT[@]}"
TOOLKIT_MAMBA_KEEP_CB=0 tp lever_fastest_no_recompute_nocb 200 8 "${FASTEST_KEPT[@]}"
# The kept states in fp32 (TOOLKIT_MAMBA_LOWP_STATES=0: as before 2026-12-07 late night, when
# bf16 ones became the default: half their bytes written, read four times and kept), against
# lever_fastest_no_recompute(_mbs4)(_gb32) in the same call.
TOOLKIT_MAMBA_LOWP_STATES=0 tp_sizes 300 lever_fastest_no_recompute_fp32states
# The residual stream in bf16 (model.fp32_residual = false, Megatron's bf16 runs) and in fp32
# (_fp32res), at the recipe's global batch too. The 800M recipe's is bf16 since 2026-12-07
# evening: the _bf16res runs are then lever_fastest_no_recompute(_mbs4) again, and _fp32res the
# A/B against them (the RESULTS.md entry of that evening ran _bf16res against fp32 defaults).
for stream in bf16res:false fp32res:true; do
  tp_sizes 200 "lever_fastest_no_recompute_${stream%%:*}" \
    --set "model.fp32_residual=${stream#*:}"
done
tp_traced lever_fastest_no_recompute_bf16res_mbs4_traced 240 4 "${FASTEST_KEPT[@]}" \
  --set model.fp32_residual=false
# Inductor's max-autotune in the fastest setting (Triton GEMM templates beside cuBLAS, picked
# with their fused epilogues where faster: GELU into fc1, the residual adds into out_proj and
# fc2), against lever_fastest_no_recompute(_mbs4); minutes of autotuning on a cold cache (the
# Inductor parts brought back in .dev keep them for later calls).
AUTOTUNE=(--set 'train.compile_mode="max-autotune-no-cudagraphs"')
tp lever_fastest_no_recompute_autotune_mbs4 600 4 "${FASTEST_KEPT[@]}" "${AUTOTUNE[@]}"
tp lever_fastest_no_recompute_autotune 600 8 "${FASTEST_KEPT[@]}" "${AUTOTUNE[@]}"
# Our conv a row at a time (TOOLKIT_CONV_STREAM=1 with model.mamba_conv_backend="triton"; the
# conv_stream sweep above) in place of causal-conv1d's, against lever_fastest_no_recompute(...).
TOOLKIT_CONV_STREAM=1 tp_sizes 300 lever_fastest_no_recompute_conv_stream \
  --set 'model.mamba_conv_backend="triton"'
# The conv sweep's fastest variant (conv_stream_mbs4's, else conv_stream's) in whole steps, if
# it beat causal-conv1d's (TOOLKIT_CONV_TILES; none if neither sweep ran in this call).
BEST_CONV=
for sweep in conv_stream_mbs4 conv_stream; do
  if [ -z "$BEST_CONV" ] && [ -e "$W/$sweep.json" ]; then
    BEST_CONV=$(python3 benchmarks/conv_kernel.py --best "$W/$sweep.json" 2>> "$W/conv_best.txt")
    echo "$sweep's best: ${BEST_CONV:-none}" | tee -a "$W/conv_best.txt"
  fi
done
if [ -n "$BEST_CONV" ]; then
  TOOLKIT_CONV_TILES=$BEST_CONV tp_sizes 300 lever_fastest_no_recompute_conv_best \
    --set 'model.mamba_conv_backend="triton"'
fi
# The backward alone a row at a time in whole steps (t2_h512: the sweep's closest, its layer
# level with causal-conv1d's within the sweep's spread, 2026-12-07 21:25-23:00).
TOOLKIT_CONV_TILES=t2_h512 tp_sizes 300 lever_fastest_no_recompute_conv_t2 \
  --set 'model.mamba_conv_backend="triton"'
# Only Inductor's own kernels tuned (train.compile_mode="coordinate-descent-tuning": block sizes
# and warps of the GELU, norm and residual-add kernels, ~13% of a micro-batch-4 step at ~2.5 TB/s
# in the 2026-12-07 night profile; 1.022x for FP8 at the 8B's widths, 1.000x for bf16 there),
# against lever_fastest_no_recompute(_mbs4)(_gb32); ~3 minutes more on a cold cache.
tp lever_fastest_no_recompute_cdt_mbs4 450 4 "${FASTEST_KEPT[@]}" "${CDT[@]}"
tp lever_fastest_no_recompute_cdt 450 8 "${FASTEST_KEPT[@]}" "${CDT[@]}"
tp lever_fastest_no_recompute_cdt_gb32 450 8 --accumulate 4 "${FASTEST_KEPT[@]}" "${CDT[@]}"
# The default without B's and C's gradients by ours (nor dt, which reads their rows), and
# with dA's gradient within the chunks by our dC kernel too (bcd: in place of mamba-ssm's
# ddAcs), against lever_fastest_no_recompute(_mbs4). (The _sbc and _nsbc runs of 2026-12-07
# noon, bc and norm,bc beside the default then, are now the default.)
TOOLKIT_TRITON_MAMBA=$(without bc dt) tp lever_fastest_no_recompute_nobc_mbs4 200 4 \
  "${FASTEST_KEPT[@]}"
TOOLKIT_TRITON_MAMBA=$(without bc dt) tp lever_fastest_no_recompute_nobc 200 8 \
  "${FASTEST_KEPT[@]}"
TOOLKIT_TRITON_MAMBA=bc,ddacs,$DEFAULT_OURS tp lever_fastest_no_recompute_bcd_mbs4 200 4 \
  "${FASTEST_KEPT[@]}"
TOOLKIT_TRITON_MAMBA=bc,ddacs,$DEFAULT_OURS tp lever_fastest_no_recompute_bcd 200 8 \
  "${FASTEST_KEPT[@]}"
# The default before 2026-12-07 morning (our state gradients alone), against the default's
# lever_fastest_no_recompute(_mbs4).
TOOLKIT_TRITON_MAMBA=dstates tp lever_fastest_no_recompute_dstates_mbs4 200 4 "${FASTEST_KEPT[@]}"
TOOLKIT_TRITON_MAMBA=dstates tp lever_fastest_no_recompute_dstates 200 8 "${FASTEST_KEPT[@]}"
# Two Inductor options in the fastest setting, against the same baselines (each compiles its
# blocks afresh: the options are in Inductor's cache key). Programmatic dependent launch in
# Inductor's kernels (off by default in torch 2.11): each may start while the one before it
# drains, the gaps between a step's ~2,300 kernels. And the split of the norms' backward
# kernels that fuse dx's row sums with the weight's column sums (Inductor's mix-order
# reduction) autotuned instead of derived from the row count.
TORCHINDUCTOR_ENABLE_PDL=1 tp lever_fastest_no_recompute_pdl_mbs4 240 4 "${FASTEST_KEPT[@]}"
TORCHINDUCTOR_ENABLE_PDL=1 tp lever_fastest_no_recompute_pdl 240 8 "${FASTEST_KEPT[@]}"
TORCHINDUCTOR_MIX_ORDER_REDUCTION_AUTOTUNE_SPLIT_SIZE=1 tp lever_fastest_no_recompute_split_mbs4 \
  240 4 "${FASTEST_KEPT[@]}"
TORCHINDUCTOR_MIX_ORDER_REDUCTION_AUTOTUNE_SPLIT_SIZE=1 tp lever_fastest_no_recompute_split \
  240 8 "${FASTEST_KEPT[@]}"
# The trainer itself with train.step_graph (its CPU tests run the Triton interpreter): the 800M
# recipe through launchers/submit.py --local, 8 steps of 2 micro-batches of 4 (fits an H100),
# eager against graphed from the same seed and data, their loss curves side by side.
trainer() {  # name timeout_s extra --set args...
  local name=$1 limit=$2; shift 2
  run "$name" "$limit" python3 launchers/submit.py recipes/800m_hybrid.toml --local \
    --set 'train.device="cuda"' --set train.steps=8 --set train.micro_batch_size=4 \
    --set train.global_batch_size=8 --set train.compile=true --set checkpoint.enabled=false \
    --set "checkpoint.dir=\"$W/ck_$name\"" --set 'train.sample_prompt=""' \
    --set logging.interval=1 --set "logging.dir=\"$W/tb_$name\"" "$@"
}
trainer trainer_eager 200
trainer trainer_step_graph 200 --set train.step_graph=true
run trainer_losses 60 python3 benchmarks/compare_losses.py "$W/tb_trainer_eager" \
  "$W/tb_trainer_step_graph"
t8b lever_8b28l_torch_adamw_gb8 240 28 --set train.compile=true --set train.global_batch_size=8 \
  --set 'train.adamw_kernel="torch"'
# At the 8B's shapes, where the clip's scale pass folded into the update is worth the most
# (against 8b28l_bf16_compile): 240 s for the cold compile of its blocks.
t8b lever_8b28l_flat_optimizer 240 28 --set train.compile=true --set train.flat_optimizer=true
TORCH_LOGS=graph_breaks,recompiles tp lever_compile_model 200 8 --set train.compile=true \
  --set 'train.compile_scope="model"'
tp lever_flat_compile_model 150 8 --set train.compile=true --set train.flat_optimizer=true \
  --set 'train.compile_scope="model"'
tp lever_autotune 240 8 --set train.compile=true \
  --set 'train.compile_mode="max-autotune-no-cudagraphs"'
tp bf16_mbs4 90 4
# The SSD's chunk length (model.mamba_chunk_size; the recipes keep the reference's 128,
# mamba-ssm's own default is 256; the same sums in another order): the kernels alone at one
# micro-batch of the 800M's and the 8B's Mamba layers, then whole steps against
# bf16_compile_mbs8 and 8b28l_bf16_compile_gb8 in the same call (items 1 and 2).
run ssd_chunks 120 python3 benchmarks/gpu_kernels.py --chunks 128,64,256
tp lever_chunk256 200 8 --set train.compile=true --set model.mamba_chunk_size=256
t8b 8b28l_bf16_chunk256_gb8 200 28 --accumulate 8 --set train.compile=true \
  --set model.mamba_chunk_size=256
# At the recipes' global batches (issue 21 items 1-3): the 8B's 8 sequences as 8 micro-batches of
# one accumulated before each update, the 800M's 32 as 4 of 8; the update's share of a step is
# then an eighth (a quarter) of what one update per micro-batch gives it.
t8b 8b28l_bf16_compile_gb8 200 28 --accumulate 8 --set train.compile=true
t8b 8b28l_fp8_compile_gb8 200 28 --accumulate 8 --set 'train.precision="fp8"' \
  --set train.compile=true
# The same FP8 runs with every block and the output layer in float8 (train.fp8_layers="all"):
# ~34 ms of the 8B's 39.8 ms of bf16 GEMMs per micro-batch are the output layer's.
t8b 8b28l_fp8_all_compile 200 28 --set 'train.precision="fp8"' --set train.compile=true \
  --set 'train.fp8_layers="all"'
t8b 8b28l_fp8_all_compile_gb8 200 28 --accumulate 8 --set 'train.precision="fp8"' \
  --set train.compile=true --set 'train.fp8_layers="all"'
# The float8 weights cast once per update instead of in each micro-batch's forward and backward
# (train.fp8_weight_cache; against 8b28l_fp8_all_compile[_gb8] in the same call).
t8b 8b28l_fp8_all_cache_compile 200 28 --set 'train.precision="fp8"' --set train.compile=true \
  --set 'train.fp8_layers="all"' --set train.fp8_weight_cache=true
t8b 8b28l_fp8_all_cache_compile_gb8 200 28 --accumulate 8 --set 'train.precision="fp8"' \
  --set train.compile=true --set 'train.fp8_layers="all"' --set train.fp8_weight_cache=true
# The cached float8 linears casting their input again in the backward, as torchao's do (the A/B
# of reading the forward's cast, the default: against 8b28l_fp8_all_cache_compile_gb8).
t8b 8b28l_fp8_all_cache_recast_gb8 200 28 --accumulate 8 --set 'train.precision="fp8"' \
  --set train.compile=true --set 'train.fp8_layers="all"' --set train.fp8_weight_cache=true \
  --fp8-recast-input
# train.fused_grad_accumulation (each linear's weight gradient added into its fp32 .grad in its
# backward; the fp32 adds of accumulation were 16.3 ms a micro-batch after the first), against
# 8b28l_bf16_compile_gb8 and 8b28l_fp8_all_cache_compile_gb8 in the same call (300 s: the blocks
# compile a second variant, for the micro-batches that find a gradient).
t8b 8b28l_bf16_fga_gb8 300 28 --accumulate 8 --set train.compile=true \
  --set train.fused_grad_accumulation=true
t8b 8b28l_fp8_all_cache_fga_gb8 300 28 --accumulate 8 "${FP8_CACHE_FGA[@]}"
# train.bf16_weight_cache: each weight cast to bf16 once a step instead of in each micro-batch's
# forward (4.3B parameters in linears at 28 layers: ~26 GB of casts a micro-batch, 7 of 8
# repeats), against 8b28l_bf16_fga_gb8 in the same call; at 14 layers (an H100) against
# 8b14l_bf16_fga_gb8; at the 800M's global batch against bf16_fga_mbs8_gb32.
run bf16_cache_gpu_test 240 python3 -m pytest -q tests/test_bf16_weight_cache.py -k gpu
# train.fp32_weight_grad_gemm on the GPU: cuBLAS's fp32-output GEMM (aten::mm.dtype) against
# float64 sums, and compiled blocks training with it.
run fp32_wgrad_gpu_test 240 python3 -m pytest -q tests/test_grad_accumulation.py -k gpu_sums_in_fp32
t8b 8b28l_bf16_fga_cache_gb8 300 28 --accumulate 8 --set train.compile=true \
  --set train.fused_grad_accumulation=true --set train.bf16_weight_cache=true
t8b 8b14l_bf16_fga_cache_gb8 240 14 --accumulate 8 --set train.compile=true \
  --set train.fused_grad_accumulation=true --set train.bf16_weight_cache=true
tp bf16_fga_cache_mbs8_gb32 300 8 --accumulate 4 --set train.compile=true \
  --set train.fused_grad_accumulation=true --set train.bf16_weight_cache=true
# The recast A/B again with the fused accumulation (against 8b28l_fp8_all_cache_fga_gb8).
t8b 8b28l_fp8_all_cache_recast_fga_gb8 300 28 --accumulate 8 "${FP8_CACHE_FGA[@]}" \
  --fp8-recast-input
# train.compile_mode="coordinate-descent-tuning" (Inductor's kernels' block sizes tuned: the
# float8 casts with their transposed copies ran at ~1.2 TB/s in the 2026-12-04 profile), each
# against the same run without in the same call. 450 s: with cold caches the first compile of
# 14 of the 8B's layers with the tuning was still running at 215 s on an H100 (2026-12-05).
t8b 8b28l_bf16_fga_cdt_gb8 450 28 --accumulate 8 --set train.compile=true \
  --set train.fused_grad_accumulation=true "${CDT[@]}"
t8b 8b28l_fp8_all_cache_fga_cdt_gb8 450 28 --accumulate 8 "${FP8_CACHE_FGA[@]}" "${CDT[@]}"
# The same three at 14 of the 8B's layers, for a GPU of 80 GB (the 28-layer runs peak at ~104 GB:
# an H100 holds 14); not item 3's shapes, but the same A/B.
t8b 8b14l_bf16_fga_gb8 240 14 --accumulate 8 --set train.compile=true \
  --set train.fused_grad_accumulation=true
t8b 8b14l_fp8_all_cache_fga_gb8 240 14 --accumulate 8 "${FP8_CACHE_FGA[@]}"
t8b 8b14l_fp8_all_cache_fga_cdt_gb8 450 14 --accumulate 8 "${FP8_CACHE_FGA[@]}" "${CDT[@]}"
tp bf16_cdt_mbs8 450 8 --set train.compile=true "${CDT[@]}"
tp bf16_compile_mbs8_gb32 200 8 --accumulate 4 --set train.compile=true
# train.fused_grad_accumulation at the 800M's global batch (item 1; against
# bf16_compile_mbs8_gb32 in the same call): 3 of its 4 micro-batches add into .grad.
tp bf16_fga_mbs8_gb32 300 8 --accumulate 4 --set train.compile=true \
  --set train.fused_grad_accumulation=true
tp fp8_compile_mbs8_gb32 200 8 --accumulate 4 --set 'train.precision="fp8"' \
  --set train.compile=true
# The 800M's output layer (1024 x 256k) is ~40% of its matmul FLOPs and stays bf16 in 'inner'
# (1.007x above): with it in float8 ('all'), and with the weights cast once a step.
tp fp8_all_compile_mbs8_gb32 200 8 --accumulate 4 --set 'train.precision="fp8"' \
  --set train.compile=true --set 'train.fp8_layers="all"'
tp fp8_all_cache_compile_mbs8_gb32 200 8 --accumulate 4 --set 'train.precision="fp8"' \
  --set train.compile=true --set 'train.fp8_layers="all"' --set train.fp8_weight_cache=true
# The gaps between kernels (9.6 ms of a bf16 micro-batch at the 8B's shapes, 15.2 in FP8 'all';
# ~10 ms of the 800M's step): the compiled blocks replayed as CUDA graphs (--cuda-graphs:
# Inductor's cudagraph trees, the gradients kept outside the graphs' memory; no recipe key until
# it pays). Against the runs above in the same call; the summary's last loss and grad norm
# (same data and seed) show that the accumulated gradients are right. FP8 without the weight
# cache: its casts are new tensors each step, which a graph would copy in or re-record for.
t8b 8b28l_bf16_cudagraphs_gb8 240 28 --accumulate 8 --cuda-graphs --set train.compile=true
t8b 8b28l_fp8_all_cudagraphs_gb8 240 28 --accumulate 8 --cuda-graphs \
  --set 'train.precision="fp8"' --set train.compile=true --set 'train.fp8_layers="all"'
tp bf16_cudagraphs_mbs8 240 8 --cuda-graphs --set train.compile=true

python3 - "$W" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, pathlib, sys
print(f"{'run':32} {'tokens/s':>9} {'step ms':>8} {'TFLOP/s':>8} {'MFU':>6} {'MFU/meas':>8} {'GB':>6}")
for p in pathlib.Path(sys.argv[1]).glob("ssd_chunks.log"):  # gpu_kernels.py --chunks
    print(*(l for l in p.read_text().splitlines() if l.startswith(("shape", "SSD"))), sep="\n")
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())
    if p.stem == "parity":
        one, bf16 = r["one_step"], r["one_step"]["gpu_bf16_autocast"]["rel_l2"]
        print(f"parity: pass={r.get('pass')}; one step, bf16 logits {bf16['logits']:.2e}, "
              f"gradient {bf16['grad (all)']:.2e}, fp32 max {one['gpu_fp32']['max_rel_l2']:.2e}; "
              f"{r['training']['steps']} steps, loss mean/max |diff| "
              f"{r['training']['mean_abs_diff']:.4f}/{r['training']['max_abs_diff']:.4f}")
    elif p.stem.startswith("opt_step"):
        ms = ", ".join(f"{k} {v:.2f}" for k, v in r["ms"].items())
        host = ", ".join(f"{k} {v:.2f}" for k, v in r["host_ms"].items())
        rel = ", ".join(f"{k} {v:.1e}" for k, v in r["params_rel_l2_after"].items())
        print(f"{p.stem} ({r['parameters'] / 1e6:.0f}M; grads in + clip + AdamW), ms: {ms}; "
              f"host ms: {host}; params rel L2 vs {r['reference']}: {rel}")
    elif p.stem == "fp8_weight_cast":
        print(f"fp8_weight_cast ({r['layers']} weights, {r['weights'] / 1e9:.2f}B), ms: "
              + ", ".join(f"{k} {v:.2f} ({r['tb_per_s'][k]:.2f} TB/s; host {r['host_ms'][k]:.2f})"
                          for k, v in r["ms"].items())
              + f"; cast_all {r['speed_up']:.2f}x, same bits {r['same_bits']}")
    elif p.stem.startswith("gated_norm"):
        print(f"{p.stem} (ms: forward / backward):", "; ".join(
            f"{k} {v['forward']:.3f} / {v['backward']:.3f}" for k, v in r["ms"].items()))
        if r.get("sweep"):
            for k in ("forward", "backward"):
                best = min(r["sweep"].items(), key=lambda kv: kv[1][k])
                print(f"  fastest {k}: {best[0]} {best[1][k]:.3f} ms")
    elif p.stem.startswith(("conv_kernel", "conv_stream")):
        print(f"{p.stem} (ms: forward / backward / a layer):", "; ".join(
            f"{k} {v['forward']:.3f} / {v['backward']:.3f} / {v['layer']:.3f}"
            for k, v in r["ms"].items()))
    elif p.stem.startswith("attention_backends"):
        print(f"{p.stem} (ms, TFLOP/s):", "; ".join(
            f"{k} {v['ms']:.3f} {v['tflops']:.0f}" for k, v in r["runs"].items()))
    elif "error" in r:
        print(f"{p.stem:32} error: {r['error']}")
    else:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{p.stem:32} {r['tokens_per_s']:9.0f} {r['step_time_s']*1e3:8.1f} "
              f"{r['tflops_per_gpu']:8.1f} {mfu:>6} {r['mfu_of_measured_bf16']:8.1%} "
              f"{r['peak_memory_gb']:6.1f}  fp8={r['fp8_engine']} fused={r['mamba_fused']} "
              f"bf16 matmul {r['measured_matmul_tflops']['bf16']:.0f} last loss "
              f"{r['losses'][-1]:.4f} grad norm {r['grad_norms'][-1]:.4f}")
        env = r.get("environment", {})
        if any(k.startswith("TORCHINDUCTOR_") for k in env.get("variables", {})):
            print(f"{'':32} Inductor options as read: {env['inductor']}")
EOF
clock_log_stop
if compgen -G "$W/*.json" > /dev/null; then  # (kernel-only calls write no run JSON)
  python3 benchmarks/clock_summary.py "$W/clocks.csv" "$W"/*.json >> "$OUT/summary.txt" 2>&1
fi
for f in "$W"/*.trace.txt; do  # each traced step's families (the kernels: runs.tar.gz)
  [ -e "$f" ] || continue
  { echo "$(basename "$f" .trace.txt):"; sed -n '1,/^top /p' "$f"; } >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
tar czf "$OUT/runs.tar.gz" -C "$W" .
# The compiled blocks, in parts under 16 MiB, to carry in .dev/ next time (if not too large).
if [ -d .gpu/inductor ] && [ "$(du -sm .gpu/inductor | cut -f1)" -lt 150 ]; then
  tar cf - -C .gpu inductor | xz -T0 -3 | split -b 15m - "$OUT/inductor.tar.xz.part"
fi
echo "total $(( $(date +%s) - START )) s"
