"""Decode speed of the inference engine with random weights at a recipe's shapes.

For each recipe, context length and batch size: the engine's slots are filled as if every row
had a prompt of `context` tokens (the KV cache holds that many positions, the Mamba state is a
fixed size anyway), then whole engine steps are timed: one token per row, sampling and
bookkeeping included. Reports per-token latency, throughput, and at batch 1 the weight bytes
read per second (the memory-bandwidth roofline of decode: compare with the device's HBM speed).
Combinations that do not fit in memory are reported as OOM and skipped.

    python benchmarks/decode.py --recipe recipes/8b_hybrid.toml --recipe recipes/8b_gpt3.toml \\
        --contexts 4096,32768 --batches 1,32,64 --device cuda --dtype bfloat16
    python benchmarks/decode.py --recipe recipes/tiny_hybrid.toml --contexts 64 --batches 1,4 \\
        --steps 5 --device cpu --dtype float32          # runs on a laptop in seconds
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from toolkit.build import build_model, resolve_device
from toolkit.config import RecipeError, load_recipe
from toolkit.inference.engine import Engine, Request, memory_bytes
from toolkit.model import count_parameters
from toolkit.tokenizer import build_tokenizer


def measure(
    engine: Engine, batch: int, context: int, steps: int, warmup: int
) -> tuple[float, float]:
    """(seconds per step, seconds per step's standard deviation) over `steps` engine steps."""
    requests = [
        Request(prompt=[0], max_new_tokens=warmup + steps + 1, stop_at_eod=False)
        for _ in range(batch)
    ]
    engine.occupy(requests, context)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - start)
    for r in requests:
        r.cancel()
    engine.step()  # frees the slots
    mean = sum(times) / len(times)
    std = (sum((t - mean) ** 2 for t in times) / len(times)) ** 0.5
    return mean, std


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/decode.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--recipe", action="append", required=True, help="recipe file (repeatable)")
    p.add_argument("--set", action="append", default=[], help="recipe override key=value")
    p.add_argument("--contexts", type=ints, default=[4096, 32768], help="comma-separated tokens")
    p.add_argument("--batches", type=ints, default=[1, 32, 64], help="comma-separated sizes")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per point")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or not args.contexts or not args.batches:
        p.error("--steps >= 1, --warmup >= 0, and at least one context and batch size")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    results = []
    print(f"device {device}, {args.dtype}")
    print(
        f"{'recipe':<16}{'context':>9}{'batch':>7}{'ms/token':>10}{'tokens/s':>12}{'weights GB/s':>14}"
    )
    for path in args.recipe:
        try:
            recipe = load_recipe(path, args.set)
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of 8B weights
        try:
            model = build_model(recipe, build_tokenizer(recipe.data.tokenizer), device).eval()
        finally:
            torch.set_default_dtype(default)
        # Bytes a decode step reads: every weight but the embedding (one row per token).
        weight_bytes = (
            count_parameters(model)["total"] - model.embedding.weight.numel()
        ) * dtype.itemsize
        for context in args.contexts:
            for batch in args.batches:
                row = {"recipe": recipe.name, "context": context, "batch": batch}
                max_len = context + args.warmup + args.steps + 2
                row["state_bytes"] = memory_bytes(model, batch, max_len)
                try:
                    engine = Engine(model, build_tokenizer("byte"), slots=batch, max_len=max_len)
                    mean, std = measure(engine, batch, context, args.steps, args.warmup)
                except torch.OutOfMemoryError:
                    row["error"] = "OOM"
                    print(f"{recipe.name:<16}{context:>9}{batch:>7}{'OOM':>10}")
                    results.append(row)
                    continue
                finally:
                    engine = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                row |= {
                    "ms_per_step": 1e3 * mean,
                    "ms_std": 1e3 * std,
                    "tokens_per_s": batch / mean,
                }
                row["weights_gb_per_s"] = weight_bytes / mean / 1e9
                results.append(row)
                print(
                    f"{recipe.name:<16}{context:>9}{batch:>7}{1e3 * mean:>10.2f}"
                    f"{batch / mean:>12.1f}{weight_bytes / mean / 1e9:>14.1f}"
                )
        del model
    if args.json:
        args.json.write_text(
            json.dumps({"device": str(device), "dtype": args.dtype, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
