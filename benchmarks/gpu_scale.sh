#!/usr/bin/env bash
# The 8B hybrid on one node of N H200s (issue 10: kind nvidia-h200-x8; on -x4 or -x2 the layouts
# that fit), in parts that each fit one device call (~9 minutes):
#   train  seq 4096, 8 steps (tokens/s and MFU of steps 4-8): first the reference's production
#          layout, TP=4 with sequence parallelism at micro-batch 4, bf16 and FP8 (8 GPUs: x DP=2;
#          4 GPUs: alone); then without SP at micro-batch 1: bf16 at TP=4 x DP=2,
#          TP=8 and TP=2 x DP=4 (8 GPUs; TP=4, TP=2 x DP=2 on 4; TP=2 on 2), FP8 at the first
#          layout, and TP=2 at 2, 4 and 8 GPUs (data-parallel scaling, per-GPU throughput kept);
#          then on 2 GPUs compiled blocks at TP=2 and at DP=2 with the optimizer state sharded
#   ckpt   save at the first layout after 2 steps, then restore it at TP=8 and TP=2 x DP=4
#          (lazy resharding): the seconds each took, from the training logs
#   serve  benchmarks/tp_serve.py at TP=N with its decode graphs against one GPU (batch 1, 64)
# Each run's log goes into $OUT/runs.tar.gz; $OUT/summary.txt is the table. Runs are skipped
# once the budget is spent (GPU_SCALE_BUDGET_S, default 500 s after set-up). Usage from the
# repository root, with .dev/ and .whl/ carried:
#     OUT=/some/dir bash benchmarks/gpu_scale.sh train|ckpt|serve
set -u
PART=${1:?which part: train, ckpt or serve}
OUT=${OUT:-runs/gpu_scale}
W=$(mktemp -d)
mkdir -p "$OUT"
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
tail -3 "$OUT/setup.log"
NGPU=$(nvidia-smi -L | wc -l)
echo "$NGPU GPUs"
source benchmarks/gpu_lib.sh
part_budget "${GPU_SCALE_BUDGET_S:-500}"
PART_MIN_S=60 PART_DIR=$W
part_done() {  # the last step's throughput
  echo "$1 exit $2 in $3 s: $(grep -E 'step [0-9]+/' "$4" | tail -1 \
    | sed 's/.*tokens\/s/tokens\/s/' | cut -c 1-160)"
}
run() { part "$@"; }  # name timeout_s command...

train() {  # name nproc tp extra...: the 8B hybrid at TP=tp x DP=nproc/tp
  local name=$1 nproc=$2 tp=$3; shift 3
  if [ "$nproc" -gt "$NGPU" ]; then echo "$name skipped ($nproc GPUs)"; return; fi
  local dp=$(( nproc / tp ))
  run "$name" 240 python3 launchers/submit.py recipes/8b_hybrid.toml --local --nproc "$nproc" \
    --set 'train.device="cuda"' --set parallel.tp="$tp" --set parallel.dp="$dp" \
    --set train.micro_batch_size=1 --set train.global_batch_size=$(( 2 * dp )) \
    --set parallel.sequence_parallel=false \
    --set logging.interval=1 --set logging.progress_bar=false --set 'train.sample_prompt=""' \
    --set "logging.dir=\"$W/tb_$name\"" "$@"
}

case $PART in
  train)
    quick=(--set train.steps=8 --set checkpoint.enabled=false)
    fp8=(--set 'train.precision="fp8"' --set train.compile=true)
    if [ "$NGPU" -ge 4 ]; then  # the 8B recipe as shipped: TP=4 + SP, micro-batch 4
      sp=(--set parallel.sequence_parallel=true --set train.micro_batch_size=4
        --set train.global_batch_size=$(( NGPU >= 8 ? 8 : 4 )))
      n=$(( NGPU >= 8 ? 8 : 4 ))
      train "tp4_sp_mbs4_on$n" "$n" 4 "${quick[@]}" "${sp[@]}"
      train "tp4_sp_mbs4_fp8_on$n" "$n" 4 "${quick[@]}" "${sp[@]}" "${fp8[@]}"
    fi
    if [ "$NGPU" -ge 8 ]; then
      train tp4_dp2 8 4 "${quick[@]}"
      train tp8 8 8 "${quick[@]}"
      train tp2_dp4 8 2 "${quick[@]}"
      train tp4_dp2_fp8 8 4 "${quick[@]}" --set 'train.precision="fp8"' --set train.compile=true
    elif [ "$NGPU" -ge 4 ]; then
      train tp4 4 4 "${quick[@]}"
      train tp4_fp8 4 4 "${quick[@]}" --set 'train.precision="fp8"' --set train.compile=true
    fi
    train tp2 2 2 "${quick[@]}"
    train tp2_dp2 4 2 "${quick[@]}"
    # Two GPUs' best candidates for issue 8's 50% MFU: compiled blocks at TP=2, and data
    # parallelism with the optimizer state sharded (no TP communication; may not fit).
    train tp2_compile 2 2 "${quick[@]}" --set train.compile=true
    train dp2_zero1_compile 2 1 "${quick[@]}" --set train.compile=true \
      --set parallel.shard_optimizer=true
    ;;
  ckpt)
    dir=(--set "checkpoint.dir=\"$W/ckpt\"")
    first=$(( NGPU >= 8 ? 4 : 2 ))
    train "save_tp${first}" "$NGPU" "$first" --set train.steps=2 "${dir[@]}"
    # checkpoint.enabled=false: resume from checkpoint.dir, write nothing (the next one reads
    # the same checkpoint).
    for tp in "$NGPU" 2; do
      train "restore_tp$tp" "$NGPU" "$tp" --set train.steps=3 --set checkpoint.enabled=false \
        "${dir[@]}"
    done
    du -sh "$W/ckpt"
    rm -rf "$W/ckpt"
    ;;
  serve)
    run "serve_tp$NGPU" 480 python3 benchmarks/tp_serve.py --recipe recipes/8b_hybrid.toml \
      --tp "$NGPU" --tp-cuda-graphs --device cuda --dtype bfloat16 --tokens 64 --batches 1,64 \
      --json "$W/serve_tp$NGPU.json"
    tail -4 "$W/serve_tp$NGPU.log"
    ;;
  *) echo "unknown part $PART: train, ckpt or serve"; exit 2 ;;
esac

{
  echo "run: last logged step (tokens/s, TFLOP/s per GPU, MFU, peak memory) or checkpoint times"
  for f in "$W"/*.log; do
    name=$(basename "$f" .log)
    echo "$name: $(grep -E 'step [0-9]+/' "$f" | tail -1 | sed 's/.*grad_norm [0-9.]* //')"
    grep -hoE "(saved checkpoint \S+ in [0-9.]+ s|resharding .*|restored in [0-9.]+ s)" "$f" \
      | sed 's/^/    /'
  done
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
tar czf "$OUT/runs.tar.gz" -C "$W" --exclude ckpt .
