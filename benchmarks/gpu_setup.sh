# Source this on the GPU host, from the repository root, before a GPU benchmark:
#     source benchmarks/gpu_setup.sh
# Installs what the device image lacks (fetched into .dev/ and .whl/ by benchmarks/gpu_fetch.sh
# on a machine with network; ../shared/device/README.md says why each) into .gpu/ (ignored, kept
# on a warm machine between calls, so a second call skips the work): zarr and its dependencies
# from .whl/, torchao, mamba-ssm (Triton kernels only) and causal-conv1d (built for sm_90,
# ~85 s, or unpacked from .dev/cc1d.tar.xz.part* that an earlier call brought back) from .dev/.
# Sets PYTHONPATH and the Triton cache (seeded from .dev/triton.tar.xz if present, which skips
# most of the ~100 s of autotuning). Safe to source twice. The versions are gpu_fetch.sh's: the
# packages are found by name, so .dev/ must hold one version of each.
GPU_SITE=$PWD/.gpu/site
mkdir -p "$GPU_SITE" .gpu/triton
if [ ! -e "$GPU_SITE/.done" ]; then
  python3 -m pip install -q --no-deps --no-index --no-cache-dir --target "$GPU_SITE" \
    .whl/*.whl .dev/torchao-*.whl
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE python3 -m pip install -q \
    --no-build-isolation --no-deps --no-index --no-cache-dir --target "$GPU_SITE" \
    .dev/mamba_ssm-*.tar.gz
  # Released mamba-ssm imports its Mamba-1 extension unconditionally; Mamba-2 does not use it.
  echo '# Mamba-1 CUDA extension not built' > "$GPU_SITE/selective_scan_cuda.py"
  if ls .dev/cc1d.tar.xz.part* > /dev/null 2>&1; then  # built by an earlier call, brought back
    cat .dev/cc1d.tar.xz.part* | tar xJf - -C "$GPU_SITE"
  else
    rm -rf /tmp/cc1d && mkdir -p /tmp/cc1d && tar xzf .dev/causal_conv1d-*.tar.gz -C /tmp/cc1d
    (cd /tmp/cc1d/causal_conv1d-* && python3 "$OLDPWD/.dev/patch_cc1d_sm90.py" setup.py --split &&
      CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 400 \
        python3 -m pip install -q --no-build-isolation --no-deps --no-index --no-cache-dir \
        --target "$GPU_SITE" .) > .gpu/causal_conv1d_build.log 2>&1 ||
      echo "causal-conv1d did not build (see .gpu/causal_conv1d_build.log)"
  fi
  # Triton's compiled kernels and autotuning results from an earlier call (same image and GPU).
  [ -e .dev/triton.tar.xz ] && tar xJf .dev/triton.tar.xz -C .gpu
  touch "$GPU_SITE/.done"
fi
export PYTHONPATH=$PWD:$GPU_SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=$PWD/.gpu/triton
python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for name in ("zarr", "torchao", "mamba_ssm", "causal_conv1d"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - report, the benchmarks fall back
        print(name, "unavailable:", e)
EOF
