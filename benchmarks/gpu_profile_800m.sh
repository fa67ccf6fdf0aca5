#!/usr/bin/env bash
# One H200, ~7 minutes: where the 800M hybrid's training step spends its GPU time at its best
# measured setting (compiled blocks, micro-batch 8, fused AdamW: 35.7% MFU on 2026-11-29), as a
# torch.profiler trace of step 6 summed by benchmarks/trace_summary.py; then the checkpoint I/O
# against the disk (benchmarks/gpu_checkpoint_io.sh). Brings back $OUT/800m.log (the training
# log and the trace summary) and gpu_checkpoint_io.sh's files under $OUT/io (WITH_IO=0 skips
# the checkpoint I/O; MBS=4 profiles micro-batches of 4, which fit an H100's 80 GB).
# Usage from the repository root, with .dev/ (the compiled blocks in .dev/inductor.tar.xz.part*
# skip most of the compilation) and .whl/ carried:
#     OUT=/some/dir bash benchmarks/gpu_profile_800m.sh
set -u
OUT=${OUT:-runs/gpu_profile_800m}
mkdir -p "$OUT"
source benchmarks/gpu_setup.sh > /tmp/gpu_setup.log 2>&1
tail -4 /tmp/gpu_setup.log
export TORCHINDUCTOR_CACHE_DIR=$PWD/.gpu/inductor
if [ ! -d .gpu/inductor ] && ls .dev/inductor.tar.xz.part* > /dev/null 2>&1; then
  cat .dev/inductor.tar.xz.part* | tar xJf - -C .gpu
fi

TB=/tmp/tb_800m
rm -rf "$TB"
timeout 240 python3 launchers/submit.py recipes/800m_hybrid.toml --local \
  --set 'train.device="cuda"' --set train.steps=7 --set train.micro_batch_size=${MBS:-8} \
  --set train.global_batch_size=${MBS:-8} --set train.compile=true --set checkpoint.enabled=false \
  --set 'checkpoint.dir="/tmp/ck"' --set logging.interval=1 --set 'train.sample_prompt=""' \
  --set "logging.dir=\"$TB\"" --set train.profile.start=6 --set train.profile.steps=1 \
  > "$OUT/800m.log" 2>&1
echo "800m exit $?"
python3 benchmarks/trace_summary.py "$TB"/profile/*.json --top 40 >> "$OUT/800m.log" 2>&1
tail -60 "$OUT/800m.log"

[ "${WITH_IO:-1}" = 0 ] && exit 0  # WITH_IO=0: the profile only
OUT=$OUT/io timeout 330 bash benchmarks/gpu_checkpoint_io.sh
rm -f "$OUT/io/setup.log"  # the device brings back at most 8 files
