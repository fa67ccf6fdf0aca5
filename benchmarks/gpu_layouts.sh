#!/usr/bin/env bash
# Layout checks and an 8B step-time measurement on a 2-GPU machine (NCCL). Usage, from the
# repository root on the GPU host:  OUT=/some/dir bash benchmarks/gpu_layouts.sh
set -u
OUT=${OUT:-runs/gpu_layouts}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
tiny() {  # name nproc overrides...
  local name=$1 nproc=$2; shift 2
  python3 launchers/submit.py recipes/tiny_hybrid.toml --local --nproc "$nproc" \
    --set 'train.device="cuda"' --set train.steps=20 --set 'train.precision="fp32"' \
    --set model.make_vocab_size_divisible_by=256 --set checkpoint.enabled=false \
    --set 'train.sample_prompt=""' --set logging.interval=1 \
    --set "logging.dir=\"$OUT/tb_$name\"" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $?"
}
tiny tp1 1
tiny tp2 2 --set parallel.tp=2
tiny dp2 2 --set parallel.dp=2 --set train.micro_batch_size=8
tiny pp2 2 --set parallel.pp=2 --set train.micro_batch_size=4
python3 benchmarks/compare_losses.py "$OUT/tb_tp1" "$OUT/tb_tp2" "$OUT/tb_dp2" "$OUT/tb_pp2" \
  | tee "$OUT/compare.txt"
[ -n "${SKIP_8B:-}" ] && exit 0

for seq in 4096 2048; do
  python3 launchers/submit.py recipes/8b_hybrid.toml --local --nproc 2 --set parallel.tp=2 \
    --set 'train.device="cuda"' --set train.steps=6 --set train.micro_batch_size=1 \
    --set train.global_batch_size=2 --set model.seq_length=$seq --set checkpoint.enabled=false \
    --set logging.interval=1 --set "logging.dir=\"$OUT/tb_8b_$seq\"" > "$OUT/8b_tp2_seq$seq.log" 2>&1
  rc=$?
  echo "8b tp2 seq $seq exit $rc"; grep -E "step [0-9]+/|parameters|Error|error" "$OUT/8b_tp2_seq$seq.log" | tail -8
  [ $rc -eq 0 ] && break
done
