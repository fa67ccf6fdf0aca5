#!/usr/bin/env bash
# One H200: the 800M hybrid at micro-batch 2 (profiled step 5) and 4 after the compiled cross-entropy,
# and checkpoint save/restore speed with 32, 8 and 2 chunk I/O threads (page cache dropped).
# Usage from the repository root:  OUT=/some/dir bash benchmarks/gpu_800m_loss_io.sh
set -u; mkdir -p $OUT
source benchmarks/gpu_setup.sh > $OUT/setup.log 2>&1
run800() {  # name mbs extra...
  local name=$1 mbs=$2; shift 2
  timeout 150 python3 launchers/submit.py recipes/800m_hybrid.toml --local --set 'train.device="cuda"' \
    --set train.steps=6 --set train.micro_batch_size=$mbs --set train.global_batch_size=16 \
    --set checkpoint.enabled=false --set 'checkpoint.dir="/tmp/ck"' --set logging.interval=1 \
    --set 'train.sample_prompt=""' --set "logging.dir=\"/tmp/tb_$name\"" "$@" > $OUT/$name.log 2>&1
  echo "$name exit $?"; grep -E "step [0-9]/" $OUT/$name.log | cut -c 40-
}
run800 mbs2 2 --set train.profile.start=5 --set train.profile.steps=1
python3 benchmarks/trace_summary.py /tmp/tb_mbs2/profile/*.json --top 25 > $OUT/trace_mbs2.txt 2>&1
run800 mbs4 4
for t in 32 8 2; do
  extra=--no-dd; [ $t = 32 ] && extra=""
  TOOLKIT_CHECKPOINT_THREADS=$t timeout 100 python3 benchmarks/checkpoint_io.py --quick $extra --drop-caches \
    --dir /tmp/ckpt-bench > $OUT/io_t$t.log 2>&1; echo "io threads $t exit $?"
  grep -E "gbps|_s |vs_dd" $OUT/io_t$t.log
done
