#!/usr/bin/env bash
# The checkpoint throughput goal on a GPU host's disk (one H200 machine, ~5 minutes): the 800M
# model with Adam state (10.9 GB) saved and restored by benchmarks/checkpoint_io.py against dd of
# zeros and of random bytes, page cache dropped before reads, the restore three times each right
# after a dd read (the disk's speed drifts between minutes); then the save again with each
# chunk's writeback started as soon as it is written (TOOLKIT_CHECKPOINT_EARLY_WRITEBACK=1); then
# with the model on the GPU (a training run's save and resume, copies between GPU and host
# included). Brings back $OUT/io.json, io_early_writeback.json, io_gpu.json and their logs.
# Usage from the repository root, with .whl/ carried (zarr and its dependencies):
#     OUT=/some/dir bash benchmarks/gpu_checkpoint_io.sh
set -u
OUT=${OUT:-runs/gpu_checkpoint_io}
mkdir -p "$OUT"
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
{ nproc; free -g; df -h /tmp; } > "$OUT/machine.txt" 2>&1
timeout 300 python3 benchmarks/checkpoint_io.py --quick --drop-caches --dir /tmp/ckpt-bench \
  --rounds 3 --json "$OUT/io.json" > "$OUT/io.log" 2>&1
echo "io exit $?"; tail -18 "$OUT/io.log"
TOOLKIT_CHECKPOINT_EARLY_WRITEBACK=1 timeout 150 python3 benchmarks/checkpoint_io.py --quick \
  --no-dd --drop-caches --dir /tmp/ckpt-bench --json "$OUT/io_early_writeback.json" \
  > "$OUT/io_early_writeback.log" 2>&1
echo "io_early_writeback exit $?"; grep -E "save|load|writeback" "$OUT/io_early_writeback.log"
timeout 150 python3 benchmarks/checkpoint_io.py --quick --no-dd --drop-caches --device cuda \
  --dir /tmp/ckpt-bench --json "$OUT/io_gpu.json" > "$OUT/io_gpu.log" 2>&1
echo "io_gpu exit $?"; grep -E "shard|save|load" "$OUT/io_gpu.log"
