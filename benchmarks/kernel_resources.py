"""Registers, spills and shared memory of our Triton SSD kernels, compiled for a Hopper GPU
(sm_90) on any machine: no GPU needed, so a kernel's tiles can be sized on a CPU before its GPU
timing. A kernel that spills (STACK > 0: bytes a thread keeps in local memory) or wants more
than the H100's 227 KB of shared memory is slow or does not launch.

    python benchmarks/kernel_resources.py [--shape 800m|8b] [--warps 4,8] [--stages 1,2]
    python benchmarks/kernel_resources.py --conv default,t1_h512,t1_p4_q64_h256

Each kernel at the recipes' Mamba widths (chunk 128, state 128, head dim 64; heads per group
4 at the 800M's widths, 16 at the 8B's) and bf16 inputs, at each warps x stages setting:
registers a thread, stack bytes a thread (spills), shared memory bytes; the kept states bf16 as
trained by default (`--states fp32` for the opt-out). The numbers are this
machine's Triton's; the GPU's may differ in detail (RESULTS.md says which ran where).
`--conv` compiles the causal conv's two kernels (toolkit/model/conv_kernel.py) instead, at
benchmarks/conv_kernel.py's variants, each at its own warps and stages.
"""

import argparse
import os
import pathlib
import subprocess
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset

import conv_kernel as conv_benchmark  # noqa: E402 - benchmarks/conv_kernel.py, its variants
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from toolkit.model import (  # noqa: E402
    conv_kernel,
    ssd_chunk_grad_kernel,
    ssd_scan_kernel,
    ssd_state_grad_kernel,
)

# pointer arguments in fp32 (the rest of the pointers are bf16); every other argument that is
# not a constexpr is an int32 (lengths, strides)
FP32 = {"weight", "bias", "dw_part", "db_part", "ring", "dt_soft", "dA_sums", "ddA_last", "A",
        "dt_bias", "D", "ddt", "dA_part", "dD_part", "dbias_part", "dt_out", "dA_out", "dt",
        "dA_rows", "dA_within"}  # fmt: skip
BF16 = {"x", "dy", "B", "C", "dB", "dC", "dstates", "dx", "y", "states_out", "states", "out",
        "dout"}  # fmt: skip
SHAPES = {"800m": 4, "8b": 16}  # heads per group


def kernels(heads_per_group: int, states: str = "bf16") -> dict:
    """name -> (jit function, {constexpr or None argument: value}, pointer dtype overrides), with
    the SSD's kept states in `states` ("bf16", the default since 2026-12-07, or "fp32": the
    state gradients' kernel then also writes their bf16 copy, states_out)."""
    widths = dict(HEADS_PER_GROUP=heads_per_group, P=64, N=128, Q=128)
    kept = {"states": states}
    block_m = {"BLOCK_M": ssd_chunk_grad_kernel.BLOCK_M}
    bc_block_m = {"BLOCK_M": ssd_chunk_grad_kernel.BC_BLOCK_M}
    return {
        "ssd_forward (p64)": (ssd_scan_kernel._ssd_forward_kernel,
                              {**widths, "BLOCK_P": 64, "BLOCK_M": ssd_scan_kernel.BLOCK_M},
                              {**kept, "dt": "bf16"}),
        "state_grads (p64_n64)": (ssd_state_grad_kernel._ssd_state_grad_kernel,
                                  {**widths, "BLOCK_P": 64, "BLOCK_N": 64,
                                   "BLOCK_Q": ssd_state_grad_kernel.BLOCK_Q,
                                   **({"states_out": None} if states == "bf16" else {})},
                                  kept),
        "head_grads": (ssd_chunk_grad_kernel._ssd_head_grad_kernel, {**widths, **block_m},
                       {**kept, "dt": "bf16"}),
        **{f"{name}_grads{label}": (ssd_chunk_grad_kernel._ssd_bc_grad_kernel,
                                    {**widths, **bc_block_m, "WHICH": which, **extra}, kept)
           for name, which in (("dC", 0), ("dB", 1))
           for label, extra in bc_variants(which)},
    }  # fmt: skip


def bc_variants(which: int) -> list[tuple[str, dict]]:
    """The B/C kernels as each path compiles them: alone ("dx"), with dA's rows ("bc") and, dC's,
    with the within-chunk dA too ("bc,ddacs"); an absent pointer is a None constexpr."""
    alone = {"dA_rows": None, "dA_within": None}
    rows = {"dA_within": None}  # dA_rows an fp32 pointer
    return [("", alone), (" +rows", rows)] + ([(" +rows +within", {})] if which == 0 else [])


def conv_kernels(variant: str) -> dict:
    """The causal conv's forward and backward kernels (toolkit/model/conv_kernel.py) at one of
    benchmarks/conv_kernel.py's variants ('default' or e.g. 't1_p4_q64_h512_w8'), width 4 with
    a bias: name -> (jit function, constants, dtype overrides, warps, stages)."""
    settings = {k: getattr(conv_kernel, k) for k in conv_kernel.TILE_KEYS.values()}
    if variant != "default":
        settings.update(conv_kernel.tile_values(variant))
    width = {"K": 4, "HAS_BIAS": True}
    channels = {"C": "i32"}  # the channel count (the SSD kernels' C is a pointer)
    warps = settings["NUM_WARPS"]
    run = {"ROWS": settings["STREAM_ROWS"], "SEGMENTS": settings["STREAM_SEGMENTS"],
           "BC": settings["STREAM_CHANNELS"], **width}  # fmt: skip
    stream = (run, channels, warps, settings["STREAM_STAGES"])
    tile = {"BC": settings["BLOCK_CHANNELS"], **width}
    forward = (
        (conv_kernel._conv_silu_fwd_stream_kernel, *stream)
        if settings["STREAM"] == 1
        else (conv_kernel._conv_silu_fwd_kernel, {"BL": settings["BLOCK_ROWS"], **tile},
              channels, warps, 3)
    )  # fmt: skip
    backward = (
        (conv_kernel._conv_silu_bwd_stream_kernel, *stream)
        if settings["STREAM"]
        else (conv_kernel._conv_silu_bwd_kernel,
              {"BL": settings["BACKWARD_BLOCK_ROWS"], "ROWS": settings["ROWS_PER_PROGRAM"],
               "SLOTS": settings["RING_SLOTS"], **tile}, channels, warps, 3)
    )  # fmt: skip
    return {f"conv_fwd {variant}": forward, f"conv_bwd {variant}": backward}


def cuobjdump(fn, constants: dict, dtypes: dict, warps: int, stages: int, flag: str,
              maxnreg=None):  # fmt: skip
    """The kernel compiled for sm_90 here, and cuobjdump's `flag` ('-res-usage', '-sass') of its
    cubin: (the compiled kernel, the text)."""
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in dtypes:  # a pointer's dtype, or "i32" (a name that is a pointer elsewhere)
            signature[name] = dtypes[name] if dtypes[name] == "i32" else "*" + dtypes[name]
        elif name in FP32:
            signature[name] = "*fp32"
        elif name in BF16:
            signature[name] = "*bf16"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    options = {"num_warps": warps, "num_stages": stages, "maxnreg": maxnreg}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as folder:
        cubin = pathlib.Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        out = subprocess.run([str(tool), flag, str(cubin)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    return compiled, out


def resources(fn, constants: dict, dtypes: dict, warps: int, stages: int, maxnreg=None) -> str:
    compiled, out = cuobjdump(fn, constants, dtypes, warps, stages, "-res-usage", maxnreg)
    usage = dict(item.split(":") for line in out.splitlines() if "REG:" in line
                 for item in line.split() if ":" in item)  # fmt: skip
    return (f"{usage['REG']:>3} registers, {usage['STACK']:>5} stack bytes, "
            f"{compiled.metadata.shared:>6} shared bytes")  # fmt: skip


def report(name: str, fn, constants: dict, dtypes: dict, warps: int, stages: int,
           maxnreg=None) -> None:  # fmt: skip
    """Print one kernel's resources at one setting; one that does not compile says so."""
    try:
        said = resources(fn, constants, dtypes, warps, stages, maxnreg)
    except Exception as e:  # noqa: BLE001 - one that does not compile: say, go on
        said = f"does not compile: {type(e).__name__}: {str(e)[:160]}"
    print(f"{name:36} w{warps} s{stages}: {said}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="800m")
    parser.add_argument("--warps", default="4,8", help="comma-separated warps a program")
    parser.add_argument("--stages", default="1", help="comma-separated software-pipeline stages")
    parser.add_argument("--only", help="kernels whose name contains this")
    parser.add_argument(
        "--states",
        choices=["bf16", "fp32"],
        default="bf16",
        help="the kept states' dtype (fp32: TOOLKIT_MAMBA_LOWP_STATES=0)",
    )
    parser.add_argument(
        "--conv",
        help="the conv's kernels instead, at these comma-separated benchmarks/conv_kernel.py "
        "variants ('default', 't1_p4_q64_h512_w8', ...), each at its own warps and stages",
    )
    parser.add_argument("--maxnreg", type=int, help="registers a thread at most (ptxas's cap)")
    parser.add_argument("--block-m", type=int, help="ssd_chunk_grad_kernel.BLOCK_M to try")
    parser.add_argument("--bc-block-m", type=int, help="ssd_chunk_grad_kernel.BC_BLOCK_M to try")
    options = parser.parse_args()
    if options.conv:
        for variant in conv_benchmark.variant_list(options.conv):
            for name, kernel in conv_kernels(variant).items():
                report(name, *kernel, options.maxnreg)
        return
    if options.block_m:
        ssd_chunk_grad_kernel.BLOCK_M = options.block_m
    if options.bc_block_m:
        ssd_chunk_grad_kernel.BC_BLOCK_M = options.bc_block_m
    for name, (fn, constants, dtypes) in kernels(SHAPES[options.shape], options.states).items():
        if options.only and options.only not in name:
            continue
        for warps in map(int, options.warps.split(",")):
            for stages in map(int, options.stages.split(",")):
                report(name, fn, constants, dtypes, warps, stages, options.maxnreg)


if __name__ == "__main__":
    main()
