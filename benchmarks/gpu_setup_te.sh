# Transformer Engine 2.20.2 on the H200 image (torch 2.11+cu130, Python 3.12, nvcc 13, no network),
# on top of benchmarks/gpu_setup.sh (zarr, torchao, mamba-ssm, causal-conv1d), which it sources.
#
# What it needs, in the repository root (ignored folders, carried to the GPU machine):
#   .dev/te/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl.part-a?
#       the 276.5 MB core library wheel (libtransformer_engine.so: every GPU architecture, it does
#       not compress) in parts of 62,000,000 bytes: one transfer carries 64 MiB, so each part
#       travels with a call of its own and `stash` keeps it outside the work tree ($TE_HOME)
#   .dev/te/transformer_engine-2.20.2-py3-none-any.whl      the Python package (1.2 MB)
#   .dev/te/transformer_engine_torch-2.20.2.tar.gz          the PyTorch extension's source (498 kB)
#   .dev/te/transformer_engine_torch-2.20.2-*.whl.part-a?   optional: that extension built by an
#       earlier call (the `pack` mode below writes the parts); skips the build (~3 min)
#   .whl/: pydantic 2.14.4, pydantic_core 2.50.5, annotated_types 0.8.0, typing_inspection 0.4.5,
#       typing_extensions 4.16.0 (Transformer Engine's recipes are pydantic dataclasses), with
#       the wheels gpu_setup.sh installs (zarr and its needs); .dev/ as gpu_setup.sh lists it
# Fetch them here (CPU machine, network), from the repository root:
#   mkdir -p .dev/te && cd .dev/te
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d . \
#     transformer-engine-cu13==2.20.2 transformer-engine==2.20.2
#   split -b 62000000 -a 2 transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl \
#     transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl.part-
#   # `pip download transformer-engine-torch` fails here at its metadata step (its setup.py
#   # wants a CUDA torch): take the sdist's URL from https://pypi.org/simple/transformer-engine-torch/
#   curl -sSLO https://files.pythonhosted.org/packages/3d/fb/c9ce298a38c22ed1059923a01cac7e1f4e4f7281d39a8679c8118febe079/transformer_engine_torch-2.20.2.tar.gz
#   cd ../../.whl && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d . pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
#
# Use on the GPU machine, from the repository root, in calls run back to back (the machine is
# given back after 30 s idle and a fresh one has nothing in $TE_HOME; `stash` says what it holds):
#   bash benchmarks/gpu_setup_te.sh stash [DIR ...]   copy the core wheel's parts found in DIRs
#                                  (default .dev/te) to $TE_HOME/parts and list what is there. A
#                                  62 MB part and the tree do not fit one call together: a call
#                                  that carries only a part does what stash does, without the
#                                  tree: mkdir -p ~/te/parts && cp PARTDIR/* ~/te/parts/ (as run
#                                  on 2026-12-03: tree + first part, then one part a call)
#   bash benchmarks/gpu_setup_te.sh prebuild   start, detached (setsid), gpu_setup.sh and the
#                                  extension's build, so that they run while parts travel; they
#                                  run from a copy of the tree in $TE_HOME/tree (needs
#                                  GPU_STATE_DIR, so that their installs are found later)
#   source benchmarks/gpu_setup_te.sh          wait for those, or run them; join the parts (sha256
#                                  checked), install into $TE_HOME/site, put it on PYTHONPATH, and
#                                  check a te.Linear FP8 forward+backward (delayed and current
#                                  scaling) against bf16. Returns 1 with the reason if a step fails.
#   bash benchmarks/gpu_setup_te.sh pack DIR   the built extension wheel as parts under 16 MiB in
#                                  DIR (what a call can bring back), for .dev/te/ next time
# A folder carried to the GPU machine lasts one call only: carry the tree (with .dev/, .whl/)
# in every call. TE_HOME (default $HOME/te) is outside it and lasts while the machine does.
# GPU_STATE_DIR, if set, becomes .gpu (gpu_setup.sh's installs and caches) for the same reason.
# Measured 2026-12-03 (benchmarks/RESULTS.md): the extension builds in 143 s (16 cores, sm_90).
# Idempotent: each stage leaves a marker and is skipped once done.

TE_VERSION=2.20.2
TE_CORE=transformer_engine_cu13-$TE_VERSION-py3-none-manylinux_2_28_x86_64.whl
TE_CORE_SHA256=30063d3699e779cce63617c3458804f7a504ce8279f2749c98313db9daae273e
TE_HOME=${TE_HOME:-$HOME/te}
TE_SITE=$TE_HOME/site
mkdir -p "$TE_HOME/parts" "$TE_HOME/wheels"
if [ -n "${GPU_STATE_DIR:-}" ] && [ ! -L .gpu ]; then
  mkdir -p "$GPU_STATE_DIR" && rm -rf .gpu && ln -s "$GPU_STATE_DIR" .gpu
fi

te_log() { echo "[gpu_setup_te $(date +%T)] $*"; }

te_stash() {  # DIR...: copy core-wheel parts into $TE_HOME/parts
  local d f
  for d in "${@:-.dev/te}"; do
    for f in "$d"/"$TE_CORE".part-*; do
      [ -e "$f" ] || continue
      cp "$f" "$TE_HOME/parts/" && te_log "stashed $(basename "$f") ($(stat -c %s "$f") bytes)"
    done
  done
  te_log "parts held: $(ls "$TE_HOME/parts" | sed 's/.*part-//' | tr '\n' ' ')"
  te_log "bytes held: $(cat "$TE_HOME"/parts/* 2>/dev/null | wc -c) of 276522776"
}

te_torch_wheel() { ls "$TE_HOME"/wheels/transformer_engine_torch-"$TE_VERSION"-*.whl 2>/dev/null | head -1; }

te_build_torch() {  # the PyTorch extension, for sm_90 only, against this torch
  [ -n "$(te_torch_wheel)" ] && return 0
  local parts=(.dev/te/transformer_engine_torch-"$TE_VERSION"-*.whl.part-*)
  if [ -e "${parts[0]}" ]; then  # built by an earlier call and brought back
    local name; name=$(basename "${parts[0]}"); name=${name%.part-*}
    cat "${parts[@]}" > "$TE_HOME/wheels/$name" && te_log "extension wheel from .dev/te: $name"
    return 0
  fi
  local t0=$SECONDS inc
  rm -rf "$TE_HOME/build" && mkdir -p "$TE_HOME/build"
  tar xzf .dev/te/transformer_engine_torch-"$TE_VERSION".tar.gz -C "$TE_HOME/build" || return 1
  # cudnn.h, nccl.h, cublasLt.h come from the nvidia-* wheels torch uses, not the CUDA toolkit.
  inc=$(python3 -c 'import glob, nvidia; print(":".join(sorted({d for r in nvidia.__path__
    for d in glob.glob(r + "/*/include") + glob.glob(r + "/cu13/include")})))')
  (cd "$TE_HOME/build/transformer_engine_torch-$TE_VERSION" &&
    CPATH=$inc${CPATH:+:$CPATH} NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=90 \
    NVTE_WITH_NCCL_EP=0 MAX_JOBS=${MAX_JOBS:-16} timeout 900 python3 -m pip wheel -v \
    --no-build-isolation --no-deps --no-index -w "$TE_HOME/wheels" .) \
    > "$TE_HOME/build_torch.log" 2>&1
  local rc=$?
  te_log "extension build exit $rc in $((SECONDS - t0)) s (log $TE_HOME/build_torch.log)"
  [ $rc -eq 0 ] || { tail -30 "$TE_HOME/build_torch.log"; return 1; }
}

te_prebuild() {  # both builds, detached: they outlive this call while the machine stays
  if [ -e "$TE_HOME/prebuild.pid" ] && kill -0 "$(cat "$TE_HOME/prebuild.pid")" 2>/dev/null; then
    te_log "prebuild already running"; return 0
  fi
  # A carried folder lasts one call: the next call's tree no longer has it (seen 2026-12-03:
  # mamba-ssm's sdist vanished under a detached gpu_setup.sh). The builds run from a copy.
  [ -n "${GPU_STATE_DIR:-}" ] || { te_log "prebuild needs GPU_STATE_DIR (see above)"; return 1; }
  rm -rf "$TE_HOME/tree" && mkdir -p "$TE_HOME/tree" &&
    tar cf - --exclude=./.gpu . | tar xf - -C "$TE_HOME/tree" || return 1
  setsid bash -c "cd '$TE_HOME/tree' && ln -sfn '$GPU_STATE_DIR' .gpu && \
    { source benchmarks/gpu_setup.sh > '$TE_HOME/gpu_setup.log' 2>&1 & \
    source benchmarks/gpu_setup_te.sh build_only > '$TE_HOME/prebuild.log' 2>&1; wait; }" \
    < /dev/null > /dev/null 2>&1 &
  echo $! > "$TE_HOME/prebuild.pid"
  te_log "prebuild started (pid $(cat "$TE_HOME/prebuild.pid"); logs in $TE_HOME)"
}

te_install() {
  [ -e "$TE_SITE/.done" ] && return 0
  local t0=$SECONDS core=$TE_HOME/wheels/$TE_CORE
  if [ ! -e "$core" ]; then
    cat "$TE_HOME"/parts/"$TE_CORE".part-* > "$core.tmp" 2>/dev/null
    if [ "$(sha256sum < "$core.tmp" | cut -d' ' -f1)" != "$TE_CORE_SHA256" ]; then
      te_log "core wheel incomplete or corrupt: parts held: $(ls "$TE_HOME/parts" | tr '\n' ' ')"
      rm -f "$core.tmp"; return 1
    fi
    mv "$core.tmp" "$core"
  fi
  [ -n "$(te_torch_wheel)" ] || { te_log "no extension wheel (build failed?)"; return 1; }
  python3 -m pip install -q --no-deps --no-index --no-cache-dir --no-compile --target "$TE_SITE" \
    "$core" .dev/te/transformer_engine-"$TE_VERSION"-py3-none-any.whl "$(te_torch_wheel)" || return 1
  touch "$TE_SITE/.done"
  te_log "installed into $TE_SITE in $((SECONDS - t0)) s"
}

te_check() {  # te.Linear FP8 forward+backward against the same product in bf16
  python3 - <<'EOF'
import torch
import transformer_engine as te_pkg
import transformer_engine.pytorch as te
from transformer_engine.common import recipe

print("transformer_engine", te_pkg.__version__, "fp8 available:", te.is_fp8_available())
torch.manual_seed(0)
x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
for name, r in (("delayed", recipe.DelayedScaling()), ("current", recipe.Float8CurrentScaling())):
    layer = te.Linear(2048, 4096, bias=False, params_dtype=torch.float32, device="cuda")
    w = layer.weight.detach().clone().requires_grad_(True)
    for _ in range(3):  # delayed scaling needs an amax history
        x.grad = layer.weight.grad = None
        with torch.autocast("cuda", torch.bfloat16), te.autocast(enabled=True, recipe=r):
            y = layer(x)
        y.float().square().mean().backward()
    xr = x.detach().clone().requires_grad_(True)
    yr = torch.nn.functional.linear(xr, w.to(torch.bfloat16))
    yr.float().square().mean().backward()
    err = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    print(f"te.Linear fp8 {name}: out {y.dtype}, rel L2 vs bf16: output {err(y, yr):.2e}, "
          f"dgrad {err(x.grad, xr.grad):.2e}, wgrad {err(layer.weight.grad, w.grad):.2e}")
    assert err(y, yr) < 0.1 and err(x.grad, xr.grad) < 0.15 and err(layer.weight.grad, w.grad) < 0.15
print("te.Linear FP8 forward+backward: ok")
EOF
}

case "${1:-}" in
  stash) shift; te_stash "$@" ;;
  prebuild) te_prebuild ;;
  build_only) te_build_torch ;;
  pack)
    w=$(te_torch_wheel); [ -n "$w" ] && mkdir -p "$2" &&
      split -b 15m -a 2 "$w" "$2/$(basename "$w").part-" && ls -la "$2" ;;
  *)
    TE_T0=$SECONDS
    if [ -e "$TE_HOME/prebuild.pid" ]; then  # wait for the detached builds (at most 15 min)
      for _ in $(seq 900); do kill -0 "$(cat "$TE_HOME/prebuild.pid")" 2>/dev/null || break; sleep 1; done
      te_log "waited $((SECONDS - TE_T0)) s for the prebuild"
    fi
    source benchmarks/gpu_setup.sh > "$TE_HOME/gpu_setup_sourced.log" 2>&1  # quick once done
    tail -6 "$TE_HOME/gpu_setup_sourced.log"
    if te_build_torch && te_install; then
      export PYTHONPATH=$TE_SITE:$PYTHONPATH
      te_check || te_log "te.Linear FP8 check FAILED"
    else
      te_log "Transformer Engine NOT installed"
    fi
    te_log "set-up $((SECONDS - TE_T0)) s"
    ;;
esac
