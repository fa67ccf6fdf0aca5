"""The optimizer step alone at a recipe's model size: torch's AdamW (fused on GPUs) against
train.flat_optimizer (toolkit/flat_adamw.py), each with the gradient clipping the benchmark
step does, plus what the flat buffers cost in the backward pass instead (gradients added into
the buffer, as autograd then does, rather than handed over as new tensors).

    python3 benchmarks/optimizer_step.py recipes/800m_hybrid.toml [--steps 20] [--json OUT]

Random gradients, no forward pass; the same gradients for both. Also checks that the two agree
after the steps (relative L2 of the parameters: fp32 rounding, ~1e-7). The update's bandwidth
counts 28 bytes per fp32 parameter (parameter, gradient and two moments read, three written).
"""

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.build import build_model, resolve_device, tokenizer_from_recipe  # noqa: E402
from toolkit.config import RecipeError, load_recipe  # noqa: E402
from toolkit.optim import build_optimizer  # noqa: E402

log = logging.getLogger("optimizer_step")


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Milliseconds of device time (CUDA events; wall time on CPUs)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end)


def benchmark(args: argparse.Namespace) -> dict:
    recipe = load_recipe(args.recipe, list(args.set))
    device = resolve_device(args.device or recipe.train.device)
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe, tokenizer_from_recipe(recipe), device)
    flat_model = copy.deepcopy(model)
    cfg = recipe.train
    optimizer = build_optimizer(model, replace(cfg, flat_optimizer=False))
    flat_optimizer = build_optimizer(flat_model, replace(cfg, flat_optimizer=True))
    params, flat_params = list(model.parameters()), list(flat_model.parameters())
    n = sum(p.numel() for p in params)
    log.info("%.0fM parameters on %s", n / 1e6, device)
    grads = [torch.empty_like(p) for p in params]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")

    def torch_step() -> None:
        for p, g in zip(params, grads):
            p.grad = g  # handed over, as autograd hands over a new gradient
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def accumulate() -> None:
        for p, g in zip(flat_params, grads):
            p.grad.add_(g)  # what autograd does with a gradient that already exists

    def flat_step() -> None:
        torch.nn.utils.clip_grad_norm_(flat_params, clip, foreach=True)
        flat_optimizer.step()
        flat_optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"torch_step": [], "flat_accumulate": [], "flat_step": []}

    def fresh_grads(step: int) -> None:
        torch.manual_seed(step)  # the same gradients for both (the clip scales them in place)
        for g in grads:
            g.normal_(std=1e-3)

    for i in range(args.warmup + args.steps):
        fresh_grads(i)
        for name, fn in (("flat_accumulate", accumulate), ("flat_step", flat_step)):
            ms = timed(fn, device)
            if i >= args.warmup:
                times[name].append(ms)
        fresh_grads(i)
        ms = timed(torch_step, device)
        if i >= args.warmup:
            times["torch_step"].append(ms)
    with torch.no_grad():
        diff = sum(float((p - q).double().square().sum()) for p, q in zip(params, flat_params))
        norm = sum(float(p.double().square().sum()) for p in params)
    ms = {k: statistics.median(v) for k, v in times.items()}
    flat_total = ms["flat_accumulate"] + ms["flat_step"]
    return {
        "recipe": args.recipe,
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": n,
        "torch_fused": bool(optimizer.param_groups[0].get("fused")),
        "ms": ms,
        "flat_total_ms": flat_total,
        "saved_ms": ms["torch_step"] - flat_total,
        "flat_update_gb_per_s": 28 * n / (ms["flat_step"] * 1e-3) / 1e9,
        "params_rel_l2_after": (diff / norm) ** 0.5,
        "steps": args.steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/optimizer_step.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe TOML file, e.g. recipes/800m_hybrid.toml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: train.device")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    try:
        result = benchmark(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    ms = result["ms"]
    print(
        f"{result['parameters'] / 1e6:.0f}M parameters: torch AdamW + clip {ms['torch_step']:.2f} "
        f"ms; flat {ms['flat_step']:.2f} ms ({result['flat_update_gb_per_s']:.0f} GB/s) + "
        f"{ms['flat_accumulate']:.2f} ms accumulating in backward = {result['flat_total_ms']:.2f}"
        f" ms (saves {result['saved_ms']:.2f}); parameters after: rel L2 "
        f"{result['params_rel_l2_after']:.1e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
