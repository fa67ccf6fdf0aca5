#!/usr/bin/env bash
# The small-scale study on one H200 (recipes/study/*.toml): train each named model on the study
# corpus (benchmarks/study_corpus.py) as its recipe says (STUDY_STEPS=N overrides the steps of
# all of them, for a shorter try), then time its decode at 4k and 16k
# context (benchmarks/decode.py, batch 1 and 16). Each model's TensorBoard events, training log
# and decode JSON go to $OUT/NAME/; benchmarks/study_report.py turns them into the plot and table.
# One model per device call fits the 600 s limit; a model cut by STUDY_LIMIT_S keeps its events.
# Usage from the repository root, with .dev/ and .whl/ carried and the corpus at $STUDY_DATA
# (default data/study: corpus_text_document.bin/.idx and tok.json):
#     OUT=/some/dir bash benchmarks/gpu_study.sh hybrid [mamba2 transformer]
# then, here: python benchmarks/study_report.py OUT --png docs/study.png
set -u
OUT=${OUT:-runs/gpu_study}
DATA=${STUDY_DATA:-data/study}
LIMIT=${STUDY_LIMIT_S:-480}
mkdir -p "$OUT"
START=$(date +%s)
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
echo "set-up $(( $(date +%s) - START )) s"; tail -4 "$OUT/setup.log"
export TORCHINDUCTOR_CACHE_DIR=$PWD/.gpu/inductor
if [ "$DATA" != data/study ]; then mkdir -p data && ln -sfn "$(realpath "$DATA")" data/study; fi
W=$(mktemp -d)  # checkpoints: not brought back
for name in "$@"; do
  mkdir -p "$OUT/$name"
  t=$(date +%s)
  timeout "$LIMIT" python3 -m toolkit.train "recipes/study/$name.toml" \
    ${STUDY_STEPS:+--set "train.steps=$STUDY_STEPS"} --set 'train.device="cuda"' \
    --set "logging.dir=\"$OUT/$name/tensorboard\"" --set "checkpoint.dir=\"$W/$name\"" \
    > "$OUT/$name/train.log" 2>&1
  echo "$name train exit $? in $(( $(date +%s) - t )) s: $(grep -a 'step ' "$OUT/$name/train.log" | tail -1 | cut -c 1-250)"
  t=$(date +%s)
  timeout 120 python3 benchmarks/decode.py --recipe "recipes/study/$name.toml" \
    --contexts 4096,16384 --batches 1,16 --device cuda --dtype bfloat16 \
    --json "$OUT/$name/decode.json" > "$OUT/$name/decode.log" 2>&1
  echo "$name decode exit $? in $(( $(date +%s) - t )) s"; tail -5 "$OUT/$name/decode.log"
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
