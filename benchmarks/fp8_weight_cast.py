"""train.fp8_weight_cache's once-a-step cast alone at a recipe's model size: every float8
linear's fp32 weight cast to float8 in the two layouts its products take, the way
cast_weights_once casts them (toolkit.fp8_weight_cache.cast_all: one multi-tensor amax pass,
then one pass a weight writing both layouts) against a cast per layer (torchao's cast compiled,
then a compiled copy into the column-major layout: what the cache did before cast_all).

    python3 benchmarks/fp8_weight_cast.py recipes/8b_hybrid.toml --set model.num_layers=28
        [--layers all] [--steps 20] [--json OUT]

Times each way's whole cast with CUDA events (device ms) and the host's time to queue it, and
checks that both give the same float8 bytes and scales. The bytes each moves at the least (the
fp32 weights read, float8 written) give its achieved bandwidth. Needs a GPU with float8
(compute capability >= 8.9) and torchao; no optimizer state, about 4 bytes a parameter.
"""

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer_step import timed  # noqa: E402
from train_throughput import add_step_arguments, check_step_arguments, write_json  # noqa: E402

from toolkit.build import build_model, resolve_device, tokenizer_from_recipe  # noqa: E402
from toolkit.config import RecipeError, load_recipe  # noqa: E402
from toolkit.precision import PrecisionError, apply_fp8  # noqa: E402

log = logging.getLogger("fp8_weight_cast")


def per_layer(layers: list) -> None:
    """The cache's cast before cast_all: each layer's weight cast, then copied column-major."""
    with torch.no_grad():
        for layer in layers:
            layer.weight_fp8 = layer.cast_weight()
            layer.weight_fp8_cm = layer.column_major(layer.weight_fp8)


def benchmark(args: argparse.Namespace) -> dict:
    from toolkit.fp8_weight_cache import Float8LinearCastOnce, cast_all

    recipe = load_recipe(args.recipe, list(args.set))
    device = resolve_device("cuda")
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe, tokenizer_from_recipe(recipe), device)
    apply_fp8(model, device=device, engine="torchao", compiled=True, layers=args.layers,
              cast_weights_once=True)  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, Float8LinearCastOnce)]
    numel = sum(layer.weight.numel() for layer in layers)
    log.info("%d float8 linears, %.2fB weights", len(layers), numel / 1e9)
    ways = {"per_layer": lambda: per_layer(layers), "cast_all": lambda: cast_all(layers)}
    ms: dict[str, list[float]] = {name: [] for name in ways}
    host_ms: dict[str, list[float]] = {name: [] for name in ways}
    casts = {}
    for i in range(args.warmup + args.steps):
        for name, cast in ways.items():  # alternated, so drifting clocks touch both alike
            device_ms, queue_ms = timed(cast, device)
            if i >= args.warmup:
                ms[name].append(device_ms)
                host_ms[name].append(queue_ms)
            casts[name] = [(m.weight_fp8, m.weight_fp8_cm) for m in layers]
    same = all(
        torch.equal(a._data.view(torch.uint8), b._data.view(torch.uint8))
        and a._data.stride() == b._data.stride()
        and torch.equal(a._scale, b._scale)
        for pair_a, pair_b in zip(casts["per_layer"], casts["cast_all"])
        for a, b in zip(pair_a, pair_b)
    )
    median = {name: statistics.median(times) for name, times in ms.items()}
    # At the least: the fp32 weights read twice (amax, cast), float8 written in two layouts;
    # the per-layer way also reads its row-major float8 again for the copy.
    least_bytes = {"per_layer": numel * (4 + 4 + 1 + 1 + 1), "cast_all": numel * (4 + 4 + 1 + 1)}
    return {
        "recipe": args.recipe,
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "layers": len(layers),
        "weights": numel,
        "ms": median,
        "host_ms": {name: statistics.median(times) for name, times in host_ms.items()},
        "tb_per_s": {n: least_bytes[n] / (median[n] * 1e-3) / 1e12 for n in median},
        "same_bits": same,
        "speed_up": median["per_layer"] / median["cast_all"],
        "steps": args.steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/fp8_weight_cast.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe TOML file, e.g. recipes/8b_hybrid.toml")
    add_step_arguments(parser, steps=20)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key"
    )
    parser.add_argument(
        "--layers",
        choices=["inner", "all"],
        default="all",
        help="which linears are float8 (train.fp8_layers; default all)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_step_arguments(parser, args)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU (float8, compute capability >= 8.9)", file=sys.stderr)
        return 2
    try:
        result = benchmark(args)
    except (RecipeError, PrecisionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(args.json, result)
    print(
        f"{result['layers']} float8 weights, {result['weights'] / 1e9:.2f}B: "
        + ", ".join(
            f"{n} {result['ms'][n]:.2f} ms ({result['tb_per_s'][n]:.2f} TB/s at the least; "
            f"host {result['host_ms'][n]:.2f} ms)"
            for n in result["ms"]
        )
        + f"; cast_all {result['speed_up']:.2f}x; same bits: {result['same_bits']}"
    )
    return 0 if result["same_bits"] else 1


if __name__ == "__main__":
    sys.exit(main())
