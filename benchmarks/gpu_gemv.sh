#!/usr/bin/env bash
# One H200, ~6 minutes: the batch-1 decode step's Triton kernels, the matrix-vector products
# (toolkit/inference/gemv.py) and flash decoding (toolkit/model/flash_decoding.py).
# `sweep`: every tile against cuBLAS at each weight shape of the 8B hybrid (gemv_sweep.py);
# `rows`: gemm_rows.py's tiles (batches 2-16) against cuBLAS at 2, 4, 8, 16 rows (gemv_sweep.py
# --rows, ~1 minute); `fused`: fc1 with its GELU in one kernel (gemv_sweep.py --fused);
# `tests`: the kernels' GPU tests; `decode`: the 8B hybrid's decode (benchmarks/decode.py, CUDA
# graphs, overlap) at 4k and 32k context, batches 1, 2, 4, 8, with the kernels and with cuBLAS
# and torch's attention, side by side; batches 2-8 without the rows kernel
# (TOOLKIT_TRITON_ROWS=off); without flash decoding; without fc1's GELU fused (=plain); at
# batches 1 and 8 with our norm kernels but without programmatic dependent launch
# (TOOLKIT_TRITON_PDL=norms), and with neither (=off);
# `profile`: the batch-1 step's kernels
# (decode_profile.py); `attention`: decode attention's kernels alone and flash decoding's plans.
# JSON and logs go to $OUT. GPU_GEMV_DECODES="decode_kernel ..." runs those of decode's runs
# alone. Usage from the repository root, with .dev/ and .whl/ carried:
#     OUT=/some/dir bash benchmarks/gpu_gemv.sh [sweep] [rows] [fused] [tests] [decode] [profile]
#       [attention]
set -u
OUT=${OUT:-runs/gpu_gemv}
mkdir -p "$OUT"
T0=$(date +%s)
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
echo "set-up $(( $(date +%s) - T0 )) s"; tail -4 "$OUT/setup.log"
source benchmarks/gpu_lib.sh
part_budget "${GPU_GEMV_BUDGET_S:-480}" "$T0"
PARTS=${*:-sweep rows fused tests decode profile attention}
want() { [[ " $PARTS " == *" $1 "* ]]; }
part_done() { echo "== $1 exit $2 in $3 s"; tail -"${PART_TAIL:-12}" "$4"; }

want tests && part tests 240 python3 -m pytest -q -x -p no:cacheprovider -m "not long" \
  tests/test_gemv.py tests/test_gemm_rows.py tests/test_flash_decoding.py tests/test_pdl.py \
  tests/test_decode_norms.py
decode() {  # name contexts batches VAR=value...: the 8B's decode under those settings
  local name=$1 contexts=$2 batches=$3; shift 3
  [[ -z "${GPU_GEMV_DECODES:-}" || " $GPU_GEMV_DECODES " == *" $name "* ]] || return 0
  (export "$@"; PART_TAIL=5 part "$name" 150 python3 benchmarks/decode.py \
    --recipe recipes/8b_hybrid.toml --contexts "$contexts" --batches "$batches" --steps 30 \
    --warmup 5 --device cuda --dtype bfloat16 --json "$OUT/$name.json")
}
if want decode; then
  decode decode_kernel 4096,32768 1,2,4,8 TOOLKIT_TRITON_GEMV=auto
  decode decode_kernel_again 4096 1 TOOLKIT_TRITON_GEMV=auto  # batch 1's spread in one run
  decode decode_norms 4096,32768 1,8 TOOLKIT_TRITON_PDL=norms  # our norms, usual launches
  decode decode_pdl_off 4096,32768 1,8 TOOLKIT_TRITON_PDL=off  # mamba-ssm's norms (pdl.py)
  decode decode_cublas 4096,32768 1,2,4,8 TOOLKIT_TRITON_GEMV=off TOOLKIT_TRITON_ATTENTION=off
  decode decode_rows_off 4096,32768 2,4,8 TOOLKIT_TRITON_ROWS=off
  decode decode_attention_off 4096,32768 1 TOOLKIT_TRITON_ATTENTION=off
  decode decode_plain 4096 1 TOOLKIT_TRITON_GEMV=plain
fi
want fused && part fused 120 python3 benchmarks/gemv_sweep.py --fused --json "$OUT/fused.json"
want profile && part profile 150 python3 benchmarks/decode_profile.py \
  --recipe recipes/8b_hybrid.toml --context 4096 --batch 1 --skip-gemv --attention off \
  --json "$OUT/profile.json"
want attention && part attention 150 python3 benchmarks/decode_profile.py \
  --recipe recipes/8b_hybrid.toml --attention only --json "$OUT/attention.json"
want sweep && part sweep 240 python3 benchmarks/gemv_sweep.py --json "$OUT/sweep.json"
want rows && part rows 150 python3 benchmarks/gemv_sweep.py --rows 2,4,8,16 \
  --json "$OUT/rows.json"
echo "total $(( $(date +%s) - T0 )) s"
