#!/usr/bin/env bash
# FP8 through Transformer Engine on one H200, checked and measured against bf16 and torchao:
# set-up (benchmarks/gpu_setup_te.sh: TE 2.20.2 plus mamba-ssm, causal-conv1d, torchao, zarr),
# the TE GPU tests of tests/test_precision.py, 50 steps of FP8 against bf16 and checkpoints across
# precisions (benchmarks/gpu_fp8_parity.py), then training throughput side by side: bf16,
# torchao float8 (tensorwise) and TE FP8 (current and delayed scaling), all with compiled blocks,
# at the 800M (seq 4096, micro-batch 8: bf16's best) and at the 8B's shapes with 28 of its 56
# layers (micro-batch 1). Runs go in priority order; one is skipped once GPU_TE_BUDGET_S (default
# 560 s, counted from the script's start) would be passed. `bash benchmarks/gpu_te.sh NAME ...`
# runs only those. Each run's JSON and log go into $OUT/runs.tar.gz, the table into
# $OUT/summary.txt; with PACK=1 the built TE extension (and causal-conv1d) come back as parts in
# $OUT/pack/ (carry them in .dev/te/ and .dev/ next time). From the repository root, with .dev/
# and .whl/ carried and the TE core wheel stashed (gpu_setup_te.sh says how):
#     OUT=/some/dir bash benchmarks/gpu_te.sh [NAME ...]
#     bash benchmarks/gpu_te.sh warm     detached, after gpu_setup_te.sh prebuild: once
#         gpu_setup.sh is done, one compiled bf16 step of each model (fills the Triton autotuning
#         and inductor caches in .gpu/) while Transformer Engine's extension builds; the main run
#         waits for it (at most 4 min). Untested: the first try ran from the carried tree, which
#         was gone by the next call; the first timed bf16 run then paid the autotuning.
set -u
OUT=${OUT:-runs/gpu_te}
TE_HOME=${TE_HOME:-$HOME/te}
mkdir -p "$OUT" "$TE_HOME"
START=$(date +%s)
export TORCHINDUCTOR_CACHE_DIR=$PWD/.gpu/inductor
P800=(python3 benchmarks/train_throughput.py recipes/800m_hybrid.toml --seq 4096 --mbs 8
  --set 'train.device="cuda"' --set train.compile=true)
P8B=(python3 benchmarks/train_throughput.py recipes/8b_hybrid.toml --seq 4096 --mbs 1
  --set 'train.device="cuda"' --set model.num_layers=28 --set train.compile=true)
STEPS=(--warmup 3 --steps 10)
FP8=(--set 'train.precision="fp8"')
AO=("${FP8[@]}" --set 'train.fp8_engine="torchao"' --set 'train.fp8_recipe="tensorwise"')
TEC=("${FP8[@]}" --set 'train.fp8_engine="transformer_engine"' --set 'train.fp8_recipe="tensorwise"')
TED=("${FP8[@]}" --set 'train.fp8_engine="transformer_engine"' --set 'train.fp8_recipe="delayed"')
TEF=("${TEC[@]}" --set train.te_fused_norm=true)  # pre-norms inside te.LayerNormLinear
EAGER=(--set train.compile=false)

case "${1:-}" in
  warm)  # from prebuild's copy of the tree: the carried tree is gone by the next call
    cd "$TE_HOME/tree" || exit 1
    setsid bash benchmarks/gpu_te.sh _warm > "$TE_HOME/warm.log" 2>&1 < /dev/null &
    echo $! > "$TE_HOME/warm.pid"
    echo "warm-up started (pid $!, log $TE_HOME/warm.log)"
    exit 0 ;;
  _warm)
    for _ in $(seq 600); do [ -e .gpu/site/.done ] && break; sleep 1; done
    source benchmarks/gpu_setup.sh
    "${P800[@]}" --warmup 1 --steps 1
    "${P8B[@]}" --warmup 1 --steps 1
    exit 0 ;;
esac

source benchmarks/gpu_setup_te.sh "" > "$OUT/setup.log" 2>&1
TE_OK=$?
tail -12 "$OUT/setup.log"
if [ "$TE_OK" != 0 ]; then  # a fresh machine without the core wheel's parts: measure nothing
  echo "Transformer Engine set-up failed (a fresh machine? gpu_setup_te.sh stash); stopping"
  exit 1
fi
if [ -e "$TE_HOME/warm.pid" ] && kill -0 "$(cat "$TE_HOME/warm.pid")" 2>/dev/null; then
  for _ in $(seq 240); do kill -0 "$(cat "$TE_HOME/warm.pid")" 2>/dev/null || break; sleep 1; done
  kill -- -"$(cat "$TE_HOME/warm.pid")" 2>/dev/null && echo "warm-up stopped"
fi
grep -E "tokens/s|Error|error" "$TE_HOME/warm.log" 2>/dev/null | tail -3
if [ "${PACK:-0}" = 1 ]; then
  bash benchmarks/gpu_setup_te.sh pack "$OUT/pack" > /dev/null
  (cd .gpu/site && tar cf - causal_conv1d* 2>/dev/null | xz -T0 -3 |
    split -b 15m -a 1 - "$OUT/pack/cc1d.tar.xz.part")
  tar czf "$OUT/pack/te_logs.tar.gz" -C "$TE_HOME" --exclude=site --exclude=parts \
    --exclude=wheels --exclude=build . 2>/dev/null
  ls -la "$OUT/pack"
fi
echo "set-up $(( $(date +%s) - START )) s"
W=$(mktemp -d)
source benchmarks/gpu_lib.sh
part_budget "${GPU_TE_BUDGET_S:-560}" "$START"
PART_ONLY="$*" PART_MIN_S=40 PART_DIR=$W PART_CUT=400
run() { part "$@"; }  # name timeout_s command...

run tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_precision.py -rs ${TESTS_K:+-k "$TESTS_K"}
run parity 150 python3 benchmarks/gpu_fp8_parity.py --steps 50 --json "$W/parity.json"
run 8b28_te_fused_eager 150 "${P8B[@]}" "${STEPS[@]}" --json "$W/8b28_te_fused_eager.json" "${TEF[@]}" "${EAGER[@]}"
run 8b28_te_eager 150 "${P8B[@]}" "${STEPS[@]}" --json "$W/8b28_te_eager.json" "${TEC[@]}" "${EAGER[@]}"
run 8b28_bf16 120 "${P8B[@]}" "${STEPS[@]}" --json "$W/8b28_bf16.json"
run 8b28_torchao 150 "${P8B[@]}" "${STEPS[@]}" --json "$W/8b28_torchao.json" "${AO[@]}"
run 8b28_te_current 150 "${P8B[@]}" "${STEPS[@]}" --json "$W/8b28_te_current.json" "${TEC[@]}"
run 8b28_te_fused 150 "${P8B[@]}" "${STEPS[@]}" --json "$W/8b28_te_fused.json" "${TEF[@]}"
run 8b28_te_delayed 150 "${P8B[@]}" "${STEPS[@]}" --json "$W/8b28_te_delayed.json" "${TED[@]}"
run 800m_bf16 100 "${P800[@]}" "${STEPS[@]}" --json "$W/800m_bf16.json"
run 800m_torchao 120 "${P800[@]}" "${STEPS[@]}" --json "$W/800m_torchao.json" "${AO[@]}"
run 800m_te_current 120 "${P800[@]}" "${STEPS[@]}" --json "$W/800m_te_current.json" "${TEC[@]}"
run 800m_te_fused 120 "${P800[@]}" "${STEPS[@]}" --json "$W/800m_te_fused.json" "${TEF[@]}"
run 800m_te_delayed 120 "${P800[@]}" "${STEPS[@]}" --json "$W/800m_te_delayed.json" "${TED[@]}"
run 800m_te_eager 120 "${P800[@]}" "${STEPS[@]}" --json "$W/800m_te_eager.json" "${TEC[@]}" "${EAGER[@]}"

python3 - "$W" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, pathlib, sys
print(f"{'run':16} {'tokens/s':>9} {'step ms':>8} {'TFLOP/s':>8} {'MFU':>6} {'GB':>6}  engine")
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())
    if p.stem == "parity":
        print("parity:", {k: (round(v["mean_abs_diff"], 4), round(v["max_abs_diff"], 4),
              v.get("pass")) for k, v in r["diffs"].items()}, "checkpoints pass:",
              r.get("checkpoints", {}).get("pass"), "all pass:", r["pass"])
    elif "error" in r:
        print(f"{p.stem:16} error: {r['error']}")
    else:
        print(f"{p.stem:16} {r['tokens_per_s']:9.0f} {r['step_time_s']*1e3:8.1f} "
              f"{r['tflops_per_gpu']:8.1f} {r['mfu']:6.1%} {r['peak_memory_gb']:6.1f}  "
              f"{r['fp8_engine']} {r['fp8_recipe']}{' fused-norm' if r.get('te_fused_norm') else ''}"
              f"{'' if r.get('compile') else ' eager'}; warm-up steps "
              f"{', '.join(f'{t:.1f}' for t in r['warmup_times_s'])} s")
EOF
cat "$OUT/summary.txt"
tar czf "$OUT/runs.tar.gz" -C "$W" .
echo "total $(( $(date +%s) - START )) s"
