"""The optimizer step alone at a recipe's model size: torch's AdamW (fused on GPUs) against
train.flat_optimizer (toolkit/flat_adamw.py), each with the trainer's gradient clipping
(toolkit.parallel.runtime.clip_and_step: in place for torch's, the coefficient folded into the
flat update) and its gradients coming in as backward would leave them: handed over as new
tensors (zero_grad(set_to_none=True), what training does; the flat one then copies them in), or
added into the flat buffer's zeroed views (set_to_none=False). Also the flat one clipped in
place first (clip_grad_norm, then the update), what folding saves.

    python3 benchmarks/optimizer_step.py recipes/800m_hybrid.toml [--steps 20] [--json OUT]

Random gradients, no forward pass; the same ones for every variant. Also checks that the flat
ones end where torch's does (relative L2 of the parameters: 0 on CPUs, fp32 rounding on GPUs).
The gradients' norm is in the JSON (`grad_norm`; clipping is active when above train.grad_clip).
"""

import argparse
import copy
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_throughput import add_step_arguments, check_step_arguments, write_json  # noqa: E402

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


def benchmark(args: argparse.Namespace) -> dict:
    recipe = load_recipe(args.recipe, list(args.set))
    device = resolve_device(args.device or recipe.train.device)
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe, tokenizer_from_recipe(recipe), device)
    cfg = recipe.train
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    env = ParallelEnv(0, 1, 0, device, tp=1, pp=1, dp=1)
    n = sum(p.numel() for p in model.parameters())
    log.info("%.0fM parameters on %s", n / 1e6, device)
    source = [torch.empty_like(p) for p in model.parameters()]
    grads: list[torch.Tensor] = []  # the step's gradients, a fresh copy for each variant
    norms: list[float] = []

    def variant(
        flat: bool, to_none: bool, fold: bool = True
    ) -> tuple[list[torch.Tensor], Callable[[], None]]:
        """The parameters and one timed step: gradients handed over (a new tensor per
        parameter, as autograd leaves them after zero_grad(set_to_none=True): made before the
        timing) or added into the existing ones (after set_to_none=False: timed, autograd's
        in-place add), clipping (the trainer's; `fold=False`: in place even for a flat
        optimizer), the update."""
        copy_of = model if not flat else copy.deepcopy(model)
        optimizer = build_optimizer(copy_of, replace(cfg, flat_optimizer=flat))
        params = list(copy_of.parameters())
        optimizer.zero_grad(set_to_none=to_none)

        def step() -> None:
            for p, g in zip(params, grads):
                if to_none:
                    p.grad = g  # `grads` is this variant's own copy (the clip scales it)
                else:
                    p.grad.add_(g)
            norms.append(clip_and_step(optimizer, params, clip, env, fold=fold))
            optimizer.zero_grad(set_to_none=to_none)

        return params, step

    variants = {
        "torch": variant(flat=False, to_none=True),
        "flat": variant(flat=True, to_none=True),
        "flat_views": variant(flat=True, to_none=False),
        "flat_clip_in_place": variant(flat=True, to_none=True, fold=False),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    host_times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        torch.manual_seed(i)  # the same gradients for every variant
        for g in source:
            g.normal_(std=1e-3)
        for name, (_, step) in variants.items():
            grads[:] = [g.clone() for g in source]
            ms, host_ms = timed(step, device)
            if i >= args.warmup:
                times[name].append(ms)
                host_times[name].append(host_ms)
    reference = variants["torch"][0]
    rel_l2 = {}
    with torch.no_grad():
        norm = sum(float(p.double().square().sum()) for p in reference)
        for name in [v for v in variants if v != "torch"]:
            pairs = zip(reference, variants[name][0])
            diff = sum(float((p - q).double().square().sum()) for p, q in pairs)
            rel_l2[name] = (diff / norm) ** 0.5
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        "recipe": args.recipe,
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": n,
        "ms": ms,  # each: gradients in, clipping, the update, zero_grad
        "host_ms": {k: statistics.median(v) for k, v in host_times.items()},  # to queue it
        "saved_ms": ms["torch"] - ms["flat"],
        "clip_fold_saved_ms": ms["flat_clip_in_place"] - ms["flat"],
        "params_rel_l2_after": rel_l2,
        "grad_clip": clip,
        "grad_norm": statistics.median(norms),  # each variant's, every step: before clipping
        "steps": args.steps,
    }


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
    ms, rel = result["ms"], result["params_rel_l2_after"]
    print(
        f"{result['parameters'] / 1e6:.0f}M parameters, gradients in + clip + AdamW: torch "
        f"{ms['torch']:.2f} ms, flat (clip folded in) {ms['flat']:.2f} ms, flat with gradient "
        f"views {ms['flat_views']:.2f} ms, flat clipped in place {ms['flat_clip_in_place']:.2f} "
        f"ms; norm {result['grad_norm']:.3g} (clip {result['grad_clip']:g}); parameters after "
        f"against torch's: rel L2 {rel['flat']:.1e}, {rel['flat_views']:.1e}, "
        f"{rel['flat_clip_in_place']:.1e}"
    )
    host = ", ".join(f"{name} {t:.2f}" for name, t in result["host_ms"].items())
    print(f"host time to queue each step, ms: {host}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
