#!/usr/bin/env bash
# mamba-ssm's SSD kernel on one H200: parity and timing, then the 800M hybrid's training throughput
# with model.kernels = reference and = mamba_ssm. Needs .dev/ and .whl/ carried (gpu_setup.sh
# installs from them). Usage from the repository root:  OUT=/dir bash benchmarks/gpu_kernels.sh
set -u
OUT=${OUT:-runs/gpu_kernels}
mkdir -p "$OUT"
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1 || { tail "$OUT/setup.log"; exit 1; }
python3 benchmarks/gpu_kernels.py 2>&1 | tee "$OUT/kernels.txt"
for kernels in mamba_ssm reference; do
  python3 launchers/submit.py recipes/800m_hybrid.toml --local --set 'train.device="cuda"' \
    --set "model.kernels=\"$kernels\"" --set train.steps=8 --set train.micro_batch_size=2 \
    --set train.global_batch_size=16 --set checkpoint.enabled=false --set logging.interval=1 \
    --set 'train.sample_prompt=""' --set "logging.dir=\"$OUT/tb_$kernels\"" \
    > "$OUT/800m_$kernels.log" 2>&1
  echo "800m $kernels exit $?"; grep -E "step [0-9]+/" "$OUT/800m_$kernels.log" | tail -3
done
