#!/usr/bin/env bash
# One H200, ~5 minutes: where FP8 loses the layers' speed-up at the 8B's shapes, and where the
# first token after a 32k prompt goes (issue 21, items 3 and 5).
#   bf16, fp8  one training step of the 8B's shapes at 28 of its 56 layers (seq 4096, micro-batch
#              1, compiled blocks; gpu_te.sh's P8B / AO settings: torchao tensorwise float8),
#              through the trainer (launchers/submit.py --local), 6 steps with step 5 traced by
#              torch.profiler (train.profile.start=5: step 4 is the profiler's warm-up; no
#              shapes recorded); each trace summed by benchmarks/trace_summary.py, then each FP8
#              one beside bf16: bf16 GEMMs against FP8 scaled_mm, amax reductions, scales, casts,
#              the rest (SSD, conv, norms, attention, optimizer, cross-entropy), gaps.
#   fp8_all    fp8 with every block and the output layer in float8 (train.fp8_layers='all').
#   bf16_gb2, fp8_all_cache_gb2  bf16, and fp8_all with each float8 weight cast once a step
#              (train.fp8_weight_cache), at 2 micro-batches a step: the traced step holds the
#              once-a-step cast and two micro-batches' casts of activations and gradients.
#   bf16_fga_gb2, fp8_all_cache_fga_gb2  the same with train.fused_grad_accumulation: the second
#              micro-batch's weight gradients added into .grad inside the blocks' backward.
#   prefill    the 8B hybrid's first token after a 32,768-token prompt (random weights, batch 1,
#              benchmarks/prefill_profile.py): matmuls with their TFLOP/s, SSD, attention, conv.
# Brings back (at most 8 files, no raw traces: they are 100s of MB): summary.txt (set-up, step
# times from the logs, the side-by-side tables, the prefill summary), bf16.txt / fp8.txt /
# fp8_all.txt (log tail and the trace's summary), kernels_*.json (kernel tables that
# trace_summary.py reads back, to re-sum on a laptop), prefill.json.
# From the repository root, with .dev/ and .whl/ carried; parts by name (default all four):
#     OUT=/some/dir bash benchmarks/gpu_profile_fp8.sh [bf16] [fp8] [fp8_all] [prefill]
#       [bf16_gb2] [fp8_all_cache_gb2] [bf16_fga_gb2] [fp8_all_cache_fga_gb2]
# Each part is skipped once GPU_PROFILE_BUDGET_S (default 540 s, counted from the start) would
# be passed.
set -u
OUT=${OUT:-runs/gpu_profile_fp8}
mkdir -p "$OUT"
START=$(date +%s)
source benchmarks/gpu_lib.sh
part_budget "${GPU_PROFILE_BUDGET_S:-540}" "$START"
PART_ONLY=${*:-bf16 fp8 fp8_all prefill} PART_MIN_S=40
W=/tmp/gpu_profile_fp8
rm -rf "$W" && mkdir -p "$W"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

source benchmarks/gpu_setup.sh > "$W/setup.log" 2>&1
tail -5 "$W/setup.log" | tee -a "$SUMMARY"
export TORCHINDUCTOR_CACHE_DIR=$PWD/.gpu/inductor
if [ ! -d .gpu/inductor ] && ls .dev/inductor.tar.xz.part* > /dev/null 2>&1; then
  cat .dev/inductor.tar.xz.part* | tar xJf - -C .gpu
fi
say "tree $(tree_digest) (benchmarks/gpu_lib.sh), set-up $(( $(date +%s) - START )) s"

TRAIN=(python3 launchers/submit.py recipes/8b_hybrid.toml --local
  --set 'train.device="cuda"' --set model.num_layers=28 --set parallel.tp=1
  --set parallel.sequence_parallel=false --set train.steps=6 --set train.micro_batch_size=1
  --set train.global_batch_size=1 --set train.compile=true --set checkpoint.enabled=false
  --set 'checkpoint.dir="/tmp/ck"' --set logging.interval=1 --set 'train.sample_prompt=""'
  --set train.profile.start=5 --set train.profile.steps=1
  --set train.fused_grad_accumulation=false)  # on by default; FGA below turns it on
AO=(--set 'train.precision="fp8"' --set 'train.fp8_engine="torchao"'
  --set 'train.fp8_recipe="tensorwise"')

PART_DIR=$W
part_say() { say "$@"; }
part_done() { say "$1 exit $2 in $3 s (limit $5 s)"; }
run() {  # name timeout_s command...: fails when not asked for or past the budget
  part "$@" && [ "$PART_RAN" = 1 ]
}

train_part() {  # name timeout_s [overrides...]: a traced run, its log's tail and trace summary
  # (MICRO=N before the call: N micro-batches in the traced step, for its matmul FLOPs)
  local name=$1 limit=$2 flops=${FLOPS:+$((FLOPS * ${MICRO:-1}))}; shift 2
  run "$name" "$limit" "${TRAIN[@]}" --set "logging.dir=\"$W/tb_$name\"" "$@" || return
  grep -E "step [0-9]+/6 " "$W/$name.log" | sed "s/^/$name: /" | tee -a "$SUMMARY"
  local trace
  trace=$(ls "$W/tb_$name"/profile/*.pt.trace.json 2>/dev/null | head -1)
  { tail -25 "$W/$name.log"; echo; } > "$OUT/$name.txt"
  if [ -n "$trace" ]; then
    say "$name trace: $(du -m "$trace" | cut -f1) MB"
    python3 benchmarks/trace_summary.py "$trace" --top 40 ${flops:+--flops "$flops"} \
      --json-out "$OUT/kernels_$name.json" >> "$OUT/$name.txt" 2>&1
  else
    say "$name: no trace written"
  fi
}

# Matmul FLOPs of one step (6 x linear weights x 4096 tokens; attention and SSD apart), for the
# GEMMs' achieved TFLOP/s.
FLOPS=$(python3 - 2> "$W/flops.log" <<'EOF'
from toolkit.build import build_model
from toolkit.config import load_recipe
from toolkit.model import count_parameters
from toolkit.tokenizer import build_tokenizer
r = load_recipe("recipes/8b_hybrid.toml", ["model.num_layers=28", "parallel.tp=1"])
m = build_model(r, build_tokenizer(r.data.tokenizer), "meta")
print(6 * count_parameters(m)["matmul"] * r.model.seq_length)
EOF
) || FLOPS=
say "matmul FLOPs per step: ${FLOPS:-unknown ($(tail -1 "$W/flops.log"))}"

train_part bf16 170
train_part fp8 200 "${AO[@]}"
train_part fp8_all 200 "${AO[@]}" --set 'train.fp8_layers="all"'
GB2=(--set train.global_batch_size=2)
MICRO=2 train_part bf16_gb2 170 "${GB2[@]}"
MICRO=2 train_part fp8_all_cache_gb2 200 "${GB2[@]}" "${AO[@]}" --set 'train.fp8_layers="all"' \
  --set train.fp8_weight_cache=true
FGA=(--set train.fused_grad_accumulation=true)  # blocks compile a second variant: longer limits
MICRO=2 train_part bf16_fga_gb2 230 "${GB2[@]}" "${FGA[@]}"
MICRO=2 train_part fp8_all_cache_fga_gb2 260 "${GB2[@]}" "${AO[@]}" "${FGA[@]}" \
  --set 'train.fp8_layers="all"' --set train.fp8_weight_cache=true
for pair in bf16:fp8:1 bf16:fp8_all:1 bf16_gb2:fp8_all_cache_gb2:2 \
    bf16_fga_gb2:fp8_all_cache_fga_gb2:2; do
  IFS=: read -r base fp8 micro <<< "$pair"
  if [ -s "$OUT/kernels_$base.json" ] && [ -s "$OUT/kernels_$fp8.json" ]; then
    say ""
    say "== $base vs torchao FP8 (tensorwise, $fp8), one traced step each =="
    python3 benchmarks/trace_summary.py "$OUT/kernels_$base.json" --vs "$OUT/kernels_$fp8.json" \
      --labels "$base,$fp8" --top 25 ${FLOPS:+--flops "$((FLOPS * micro))"} 2>&1 |
      tee -a "$SUMMARY"
  fi
done

if run prefill 150 python3 benchmarks/prefill_profile.py --recipe recipes/8b_hybrid.toml \
    --context 32768 --top 30 --json "$OUT/prefill.json"; then
  say ""
  say "== 8B hybrid, first token after a 32k prompt =="
  grep -v "^USDT" "$W/prefill.log" | sed '/launching ops:$/,$d' | tee -a "$SUMMARY"
fi
say "total $(( $(date +%s) - START )) s"
