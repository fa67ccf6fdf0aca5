#!/usr/bin/env bash
# One H200, ~5 minutes: the decode step's matrix-vector kernel (toolkit/inference/gemv.py).
# `sweep`: every tile against cuBLAS at each weight shape of the 8B hybrid (gemv_sweep.py);
# `tests`: its GPU tests; `decode`: the 8B hybrid's batch-1 decode (benchmarks/decode.py, 4k
# context, CUDA graphs, overlap) with the kernel and with TOOLKIT_TRITON_GEMV=off, side by side,
# and at batches 2-8 (cuBLAS there: a check that nothing else moved); `profile`: the batch-1
# step's kernels (decode_profile.py) with the kernel. JSON and logs go to $OUT. Usage from the
# repository root, with .dev/ and .whl/ carried:
#     OUT=/some/dir bash benchmarks/gpu_gemv.sh [sweep] [tests] [decode] [profile]
set -u
OUT=${OUT:-runs/gpu_gemv}
mkdir -p "$OUT"
T0=$(date +%s)
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
echo "set-up $(( $(date +%s) - T0 )) s"; tail -4 "$OUT/setup.log"
source benchmarks/gpu_lib.sh
part_budget "${GPU_GEMV_BUDGET_S:-480}" "$T0"
PARTS=${*:-sweep tests decode profile}
want() { [[ " $PARTS " == *" $1 "* ]]; }
part_done() { echo "== $1 exit $2 in $3 s"; tail -"${PART_TAIL:-12}" "$4"; }

want sweep && part sweep 240 python3 benchmarks/gemv_sweep.py --json "$OUT/sweep.json"
want tests && part tests 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_gemv.py
decode() {  # name gemv batches
  TOOLKIT_TRITON_GEMV=$2 PART_TAIL=5 part "$1" 120 python3 benchmarks/decode.py \
    --recipe recipes/8b_hybrid.toml --contexts 4096 --batches "$3" --steps 30 --warmup 5 \
    --device cuda --dtype bfloat16 --json "$OUT/$1.json"
}
want decode && decode decode_kernel auto 1,2,4,8 && decode decode_cublas off 1,2,4,8
want profile && part profile 150 python3 benchmarks/decode_profile.py \
  --recipe recipes/8b_hybrid.toml --context 4096 --batch 1 --skip-gemv --json "$OUT/profile.json"
echo "total $(( $(date +%s) - T0 )) s"
