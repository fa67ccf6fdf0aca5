"""The optimizer step alone at a recipe's model size: torch's AdamW (fused on GPUs) against
train.adamw_kernel="triton" (toolkit/triton_adamw.py) and train.flat_optimizer
(toolkit/flat_adamw.py), each with the trainer's gradient clipping
(toolkit.parallel.runtime.clip_and_step: in place for torch's, the coefficient folded into the
Triton and the flat updates) and its gradients coming in as backward would leave them: handed over as new
tensors (zero_grad(set_to_none=True), what training does; the flat one then copies them in), or
added into the flat buffer's zeroed views (set_to_none=False). Also the flat one clipped in
place first (clip_grad_norm, then the update), what folding saves.

    python3 benchmarks/optimizer_step.py recipes/800m_hybrid.toml [--steps 20] [--json OUT]
        [--variants torch,triton,flat,flat_views,flat_clip_in_place,triton_b1024_w8_x4_stream]

Random gradients, no forward pass; the same ones for every variant. The variants run one after
another, each on a model of its own built from the same seed (~20 bytes a parameter on the
device at a time: the 8B's shapes at 28 layers fit one H200). Also checks that the others end
where the first does (relative L2 of the parameters: 0 on CPUs, fp32 rounding on GPUs).
The gradients' norm is in the JSON (`grad_norm`; clipping is active when above train.grad_clip).
A variant `triton_bBLOCK_wWARPS[_xSPAN][_stream][_approx]` is the Triton kernel with BLOCK elements a
block, WARPS warps, SPAN blocks a program (the next one's loads issued before a block's stores)
and, with `_stream`, evict-first loads and stores, with `_approx`, the GPU's approximate division
and square root (the defaults: triton_adamw's BLOCK, NUM_WARPS, SPAN, STREAM and EXACT): what its
bandwidth depends on.
"""

import argparse
import logging
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_throughput import add_step_arguments, check_step_arguments, write_json  # noqa: E402

from toolkit import triton_adamw  # noqa: E402
from toolkit.build import build_model, resolve_device, tokenizer_from_recipe  # noqa: E402
from toolkit.config import RecipeError, load_recipe  # noqa: E402
from toolkit.distributed import ParallelEnv  # noqa: E402
from toolkit.optim import build_optimizer  # noqa: E402
from toolkit.parallel.runtime import clip_and_step  # noqa: E402

log = logging.getLogger("optimizer_step")


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Milliseconds of device time (CUDA events; wall time on CPUs) and of host time to queue
    the work (the same on CPUs). Host time near device time: the step is launch-bound, and in
    training it is hidden only while the host runs ahead of the GPU."""
    start = time.perf_counter()
    if device.type != "cuda":
        fn()
        wall = (time.perf_counter() - start) * 1e3
        return wall, wall
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    host = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end), host


VARIANTS = {  # name: (train.adamw_kernel, flat optimizer, zero_grad(set_to_none=...), clip folded)
    "torch": ("torch", False, True, True),
    "triton": ("triton", False, True, True),
    "flat": ("torch", True, True, True),
    "flat_views": ("torch", True, False, True),
    "flat_clip_in_place": ("torch", True, True, False),
}
# The Triton kernel's block, warps, blocks a program, evict-first accesses and exact math.
KERNEL_SHAPE = re.compile(r"triton_b(\d+)_w(\d+)(?:_x(\d+))?(_stream)?(_approx)?")
SHAPE_GLOBALS = ("BLOCK", "NUM_WARPS", "SPAN", "STREAM", "EXACT")  # triton_adamw's, set per variant
DEFAULT_SHAPE = tuple(getattr(triton_adamw, name) for name in SHAPE_GLOBALS)


def variant(name: str) -> tuple[tuple, tuple]:
    """(VARIANTS[name], the Triton kernel's shape: the module's defaults), or for
    triton_bBLOCK_wWARPS[_xSPAN][_stream][_approx] the Triton kernel's with those."""
    shape = KERNEL_SHAPE.fullmatch(name)
    if shape is None:
        return VARIANTS[name], DEFAULT_SHAPE
    block, warps, span = int(shape[1]), int(shape[2]), int(shape[3] or 1)
    if block & (block - 1) or not 256 <= block <= 65536 or warps not in (1, 2, 4, 8, 16, 32):
        raise argparse.ArgumentTypeError(
            f"{name}: BLOCK a power of two from 256 to 65536, WARPS one of 1 to 32 (powers of 2)"
        )
    if not 1 <= span <= 16:
        raise argparse.ArgumentTypeError(f"{name}: SPAN (blocks a program) from 1 to 16")
    return VARIANTS["triton"], (block, warps, span, shape[4] is not None, shape[5] is None)


def run_variant(
    name: str,
    recipe: object,
    device: torch.device,
    clip: float,
    args: argparse.Namespace,
    norms: list[float],
) -> tuple[list[float], list[float], list[torch.Tensor]]:
    """One variant's timed steps on a model of its own (from the recipe's seed): device and
    host milliseconds of each, and its parameters after, on the host. Each step's gradients are
    handed over (a new tensor per parameter, as autograd leaves them after
    zero_grad(set_to_none=True): made before the timing) or added into the existing ones (after
    set_to_none=False: timed, autograd's in-place add); then the trainer's clipping (in place
    for a flat optimizer too where the variant does not fold it) and the update."""
    (kernel, flat, to_none, fold), shape = variant(name)
    for global_name, value in zip(SHAPE_GLOBALS, shape):  # read at each launch
        setattr(triton_adamw, global_name, value)
    cfg = recipe.train
    env = ParallelEnv(0, 1, 0, device, tp=1, pp=1, dp=1)
    torch.manual_seed(cfg.seed)
    model = build_model(recipe, tokenizer_from_recipe(recipe), device)
    log.info("%s: %.0fM parameters on %s", name, sum(p.numel() for p in model.parameters()) / 1e6,
             device)  # fmt: skip
    optimizer = build_optimizer(model, replace(cfg, adamw_kernel=kernel, flat_optimizer=flat))
    params = list(model.parameters())
    optimizer.zero_grad(set_to_none=to_none)
    grads: list[torch.Tensor] = []

    def step() -> None:
        for p, g in zip(params, grads):
            if to_none:
                p.grad = g
            else:
                p.grad.add_(g)
        norms.append(clip_and_step(optimizer, params, clip, env, fold=fold))
        optimizer.zero_grad(set_to_none=to_none)

    times, host_times = [], []
    for i in range(args.warmup + args.steps):
        torch.manual_seed(i)  # the same gradients for every variant
        grads.clear()  # the last step's first: two sets at once did not fit at the 8B's shapes
        grads.extend(torch.empty_like(p).normal_(std=1e-3) for p in params)
        ms, host_ms = timed(step, device)
        if i >= args.warmup:
            times.append(ms)
            host_times.append(host_ms)
    return times, host_times, [p.detach().to("cpu", copy=True) for p in params]


MIN_BYTES_PER_PARAMETER = 4 + 7 * 4  # the norm's read, then the update's 4 reads and 3 writes


def benchmark(args: argparse.Namespace) -> dict:
    recipe = load_recipe(args.recipe, list(args.set))
    device = resolve_device(args.device or recipe.train.device)
    clip = recipe.train.max_grad_norm  # the trainer's
    times: dict[str, list[float]] = {}
    host_times: dict[str, list[float]] = {}
    norms: list[float] = []
    reference: list[torch.Tensor] = []  # the first variant's parameters after
    reference_norm = 0.0  # their squared L2 norm
    rel_l2: dict[str, float] = {}
    # One variant on the device at a time (its model, gradients and AdamW state: ~20 bytes a
    # parameter), each from the same initial weights and with the same gradients.
    for name in args.variants:
        times[name], host_times[name], after = run_variant(name, recipe, device, clip, args, norms)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not reference:
            reference = after
            reference_norm = sum(float(p.double().square().sum()) for p in reference)
            continue
        diff = sum(float((p - q).double().square().sum()) for p, q in zip(reference, after))
        rel_l2[name] = (diff / reference_norm) ** 0.5
    ms = {k: statistics.median(v) for k, v in times.items()}
    n = sum(p.numel() for p in reference)
    return {
        "recipe": args.recipe,
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": n,
        "ms": ms,  # each: gradients in, clipping, the update, zero_grad
        "host_ms": {k: statistics.median(v) for k, v in host_times.items()},  # to queue it
        "saved_ms": ms["torch"] - ms["flat"] if {"torch", "flat"} <= set(ms) else None,
        "triton_saved_ms": ms["torch"] - ms["triton"] if {"torch", "triton"} <= set(ms) else None,
        # The bytes a clipped AdamW step must move (the norm reads each fp32 gradient; the update
        # reads parameter, gradient and both moments and writes three back) over each one's time:
        # against the device's bandwidth, how far from "at HBM speed" it is.
        "gb_per_s_at_32_bytes": {k: MIN_BYTES_PER_PARAMETER * n / t / 1e6 for k, t in ms.items()},
        "clip_fold_saved_ms": (
            ms["flat_clip_in_place"] - ms["flat"]
            if {"flat", "flat_clip_in_place"} <= set(ms)
            else None
        ),  # fmt: skip
        "params_rel_l2_after": rel_l2,  # against the first variant's
        "reference": args.variants[0],
        "grad_clip": clip,
        "grad_norm": statistics.median(norms),  # each variant's, every step: before clipping
        "steps": args.steps,
    }


def variant_list(text: str) -> list[str]:
    """--variants: names from VARIANTS or triton_bBLOCK_wWARPS[_xSPAN][_stream][_approx], comma-separated,
    each once."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS and not KERNEL_SHAPE.fullmatch(v)]
    if unknown or not names or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give names from {', '.join(VARIANTS)} or "
            "triton_bBLOCK_wWARPS[_xSPAN][_stream][_approx], "
            "comma-separated, each once"
        )
    for name in names:
        variant(name)  # a kernel shape out of range: said here
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/optimizer_step.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe TOML file, e.g. recipes/800m_hybrid.toml")
    add_step_arguments(parser, steps=20)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: train.device")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key"
    )
    parser.add_argument(
        "--variants",
        type=variant_list,
        default=list(VARIANTS),
        help=f"which to run, in order; the first is the others' reference (default "
        f"{','.join(VARIANTS)})",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_step_arguments(parser, args)
    try:
        result = benchmark(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(args.json, result)
    times = ", ".join(f"{name} {t:.2f}" for name, t in result["ms"].items())
    rel = ", ".join(f"{name} {r:.1e}" for name, r in result["params_rel_l2_after"].items())
    print(
        f"{result['parameters'] / 1e6:.0f}M parameters, gradients in + clip + AdamW, ms: {times}; "
        f"norm {result['grad_norm']:.3g} (clip {result['grad_clip']:g}); parameters after "
        f"against {result['reference']}'s: rel L2 {rel or '-'}"
    )
    host = ", ".join(f"{name} {t:.2f}" for name, t in result["host_ms"].items())
    print(f"host time to queue each step, ms: {host}")
    rates = ", ".join(f"{name} {r:.0f}" for name, r in result["gb_per_s_at_32_bytes"].items())
    print(f"GB/s at the 32 bytes a parameter a clipped update must move: {rates}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
