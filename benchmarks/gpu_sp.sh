#!/usr/bin/env bash
# One H200: the CUDA paths of TP=2 + sequence parallelism in bf16 and float8 (two ranks sharing
# the GPU through gloo) against one rank, then the memory planner against measured peaks.
# Usage from the repository root (.dev/ and .whl/ carried for zarr and torchao; mamba-ssm is not
# needed: the Mamba layers run the reference kernels, and the planner is told so):
#     OUT=/some/dir bash benchmarks/gpu_sp.sh
set -u
OUT=${OUT:-runs/gpu_sp}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl .dev/torchao-*.whl > "$OUT/setup.log" 2>&1
  export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONUNBUFFERED=1
REF="--set model.kernels='reference'"
t0=$(date +%s)
timeout 240 python3 benchmarks/gpu_sp.py tp --layers 6 --seq 2048 --steps 5 $REF 2>&1 |
  grep -v Warning | tee "$OUT/tp.log" | grep '^{'
echo "tp: $(( $(date +%s) - t0 )) s"
mem() {  # recipe overrides...
  local recipe=$1; shift
  timeout 120 python3 benchmarks/gpu_sp.py memory "recipes/$recipe.toml" $REF "$@" 2>&1 |
    tee -a "$OUT/memory.log" | grep '^{'
}
mem 800m_hybrid --set train.micro_batch_size=2 --set train.global_batch_size=2
mem 800m_hybrid --set train.micro_batch_size=4 --set train.global_batch_size=4 \
  --set "train.activation_checkpointing='full'"
for layers in 4 8; do
  mem 8b_hybrid --set model.num_layers=$layers --set "model.pattern='$(python3 -c "print('M-M*-M-M'[:$layers])")'" \
    --set model.att_ratio=$(python3 -c "p='M-M*-M-M'[:$layers]; print(p.count('*')/len(p))") \
    --set model.mlp_ratio=$(python3 -c "p='M-M*-M-M'[:$layers]; print(p.count('-')/len(p))") \
    --set parallel.tp=1 --set parallel.sequence_parallel=false \
    --set train.micro_batch_size=1 --set train.global_batch_size=1
done
echo "all: $(( $(date +%s) - t0 )) s"
