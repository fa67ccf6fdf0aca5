#!/usr/bin/env bash
# Sharded checkpoints on a 2-GPU machine: checkpoint I/O of the 800M model against the disk, a
# TP=2 run with asynchronous saves resumed at TP=1, and the 800M save at TP=1 versus TP=2.
# Usage, from the repository root on the GPU host:  OUT=/some/dir bash benchmarks/gpu_checkpoint.sh
set -u
OUT=${OUT:-runs/gpu_checkpoint}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
{ nproc; free -g; df -h /tmp .; } > "$OUT/machine.txt" 2>&1

python3 benchmarks/checkpoint_io.py --recipe recipes/800m_hybrid.toml --dir /tmp/ckpt-bench \
  --drop-caches --json "$OUT/io_800m.json" > "$OUT/io_800m.log" 2>&1
echo "io_800m exit $?"; tail -20 "$OUT/io_800m.log"

tiny() {  # name nproc overrides...
  local name=$1 nproc=$2; shift 2
  # The vocabulary is padded alike at TP 1 and 2 so that both runs start from the same weights.
  python3 launchers/submit.py recipes/tiny_hybrid.toml --local --nproc "$nproc" \
    --set 'train.device="cuda"' --set 'train.precision="fp32"' --set 'train.sample_prompt=""' \
    --set logging.interval=1 --set checkpoint.keep_last=0 \
    --set model.make_vocab_size_divisible_by=256 "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $?"
}
tiny ref 1 --set train.steps=20 --set "checkpoint.dir=\"$OUT/ck_ref\"" \
  --set "logging.dir=\"$OUT/tb_ref\""
tiny tp2_async 2 --set parallel.tp=2 --set train.steps=10 --set checkpoint.interval=5 \
  --set checkpoint.async_save=true --set "checkpoint.dir=\"$OUT/ck_tiny\"" \
  --set "logging.dir=\"$OUT/tb_tiny\""
tiny resumed_tp1 1 --set train.steps=20 --set "checkpoint.dir=\"$OUT/ck_tiny\"" \
  --set "logging.dir=\"$OUT/tb_tiny\""
grep -hE "resharding|resumed from|saved checkpoint|training resumed after" "$OUT"/tp2_async.log \
  "$OUT"/resumed_tp1.log
python3 benchmarks/compare_losses.py "$OUT/tb_ref" "$OUT/tb_tiny" | tee "$OUT/compare.txt"

for tp in 1 2; do
  python3 launchers/submit.py recipes/800m_hybrid.toml --local --nproc "$tp" \
    --set parallel.tp=$tp --set 'train.device="cuda"' --set train.steps=2 \
    --set train.micro_batch_size=1 --set train.global_batch_size=8 \
    --set "checkpoint.dir=\"/tmp/ck800_tp$tp\"" \
    --set "logging.dir=\"$OUT/tb_800m_tp$tp\"" --set 'train.sample_prompt=""' \
    > "$OUT/800m_tp$tp.log" 2>&1
  echo "800m tp$tp exit $?"; grep -hE "saved checkpoint|Error" "$OUT/800m_tp$tp.log" | tail -3
  du -sh /tmp/ck800_tp$tp; rm -rf /tmp/ck800_tp$tp
done
