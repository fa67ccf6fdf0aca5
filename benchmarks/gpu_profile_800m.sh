#!/usr/bin/env bash
# One H200: where the 800M hybrid's training step spends its GPU time (a torch.profiler trace of
# step 6, summed by benchmarks/trace_summary.py), checkpoint I/O against the disk, and our Mamba-2
# mixer against mamba-ssm's Mamba2 module. Also packs the causal-conv1d build into $OUT (in parts
# under 16 MiB) so that a later call can carry it in .dev/ instead of building it again.
# Usage from the repository root:  OUT=/some/dir bash benchmarks/gpu_profile_800m.sh
set -u
OUT=${OUT:-runs/gpu_profile_800m}
mkdir -p "$OUT"
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
(cd .gpu/site && tar cJf - causal_conv1d*) | split -b 15m - "$OUT/cc1d.tar.xz.part"

TB=/tmp/tb_800m
timeout 200 python3 launchers/submit.py recipes/800m_hybrid.toml --local \
  --set 'train.device="cuda"' --set train.steps=7 --set train.micro_batch_size=2 \
  --set train.global_batch_size=16 --set checkpoint.enabled=false --set 'checkpoint.dir="/tmp/ck"' \
  --set logging.interval=1 --set 'train.sample_prompt=""' --set "logging.dir=\"$TB\"" \
  --set train.profile.start=6 --set train.profile.steps=1 > "$OUT/800m.log" 2>&1
echo "800m exit $?"
python3 benchmarks/trace_summary.py "$TB"/profile/*.json --top 30 >> "$OUT/800m.log" 2>&1

timeout 240 python3 benchmarks/checkpoint_io.py --recipe recipes/800m_hybrid.toml \
  --dir /tmp/ckpt-bench --drop-caches > "$OUT/checkpoint_io.log" 2>&1
echo "checkpoint_io exit $?"

timeout 150 python3 benchmarks/gpu_mamba_block.py --no-parity > "$OUT/mamba_block.log" 2>&1
echo "mamba_block exit $?"
