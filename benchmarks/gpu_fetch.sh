#!/usr/bin/env bash
# Fetch here, on a machine with network, what benchmarks/gpu_setup.sh installs on a GPU machine
# that has none: wheels for its Python 3.12 into .whl/ (zarr and what it needs beyond the image's
# packages, submitit) and .dev/ (torchao), the source packages of mamba-ssm and causal-conv1d
# into .dev/ (built or installed there), and causal-conv1d's sm_90 build patch. Both folders are
# ignored by git; carry both in every GPU call (`carry: [".dev", ".whl"]`). Idempotent.
# Usage from the repository root, with a Python that has torch (the source packages' metadata
# step imports it; `make install-dev` makes .venv):
#     bash benchmarks/gpu_fetch.sh [PYTHON]        (default .venv/bin/python)
# The build patch comes from ../shared/device/patch_cc1d_sm90.py (or $CC1D_PATCH).
set -euo pipefail
PY=${1:-.venv/bin/python}
PATCH=${CC1D_PATCH:-../shared/device/patch_cc1d_sm90.py}
"$PY" -c "import torch" 2> /dev/null || { echo "error: $PY has no torch (make install-dev)"; exit 2; }
mkdir -p .dev .whl
WHEELS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q "${WHEELS[@]}" -d .whl zarr==3.1.6 numcodecs==0.17.1 \
  donfig==0.8.1.post1 google-crc32c==1.9.0 submitit==1.5.4
"$PY" -m pip download -q "${WHEELS[@]}" -d .dev torchao==0.18.0
"$PY" -m pip install -q wheel packaging ninja
CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download -q --no-deps --no-binary :all: \
  --no-build-isolation -d .dev causal-conv1d==1.7.0
MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download -q --no-deps --no-binary :all: \
  --no-build-isolation -d .dev mamba-ssm==2.3.2.post1
if [ -e "$PATCH" ]; then
  cp "$PATCH" .dev/patch_cc1d_sm90.py
elif [ ! -e .dev/patch_cc1d_sm90.py ]; then
  echo "warning: no $PATCH: causal-conv1d will not build on the GPU machine (set CC1D_PATCH)"
fi
ls -l .whl .dev | grep -v "^total"
du -sh .whl .dev
