"""How long `toolkit.inference.generate` takes on its first call in a fresh process against later
calls: the sample printed at the end of training (train.sample_prompt: 200 tokens, temperature
0.7, top-k 20, through `toolkit.train.sample_text`) and a greedy generation, each called
`--calls` times. A fresh process pays what no later call does (CUDA context, Triton kernels
compiled or read from the cache, cuBLAS handles); every call records its own CUDA graphs.

    python benchmarks/generate_warm.py --recipe recipes/tiny_hybrid.toml --device cuda \\
        --json warm.json
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import synchronize, write_json  # noqa: E402

from toolkit.build import build_model, resolve_device  # noqa: E402
from toolkit.config import RecipeError, load_recipe  # noqa: E402
from toolkit.inference.generate import generate  # noqa: E402
from toolkit.tokenizer import build_tokenizer  # noqa: E402
from toolkit.train import sample_text  # noqa: E402


def timed(fn, device: torch.device) -> float:
    """Seconds one call of `fn()` takes, the device's queue drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="recipes/tiny_hybrid.toml", help="model recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="parameters' dtype (default: bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=200, help="new tokens a call (default 200)")
    parser.add_argument("--calls", type=int, default=10, help="calls of each kind (default 10)")
    parser.add_argument("--prompt", default="def main(", help="the prompt")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.calls < 2:
        parser.error("--tokens must be >= 1 and --calls >= 2")
    try:
        recipe = load_recipe(args.recipe, args.set)
        device = resolve_device(args.device, "--device")
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    start = time.perf_counter()
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    torch.manual_seed(0)
    model = build_model(recipe, tokenizer, device, dtype).eval()
    built = time.perf_counter() - start
    ids = torch.tensor([tokenizer.encode(args.prompt)])

    kinds = {
        "closing_sample": lambda: sample_text(
            model, tokenizer, args.prompt, seed=0, max_new_tokens=args.tokens
        ),
        "greedy": lambda: generate(model, ids, args.tokens),
    }
    result = {"recipe": args.recipe, "device": str(device), "dtype": str(dtype),
              "tokens": args.tokens, "model_built_s": built}  # fmt: skip
    print(f"{args.recipe} on {device} ({dtype}), model built in {built:.2f} s")
    for name, fn in kinds.items():
        seconds = [timed(fn, device) for _ in range(args.calls)]
        first, tenth = seconds[0], seconds[min(9, len(seconds) - 1)]
        result[name] = {"seconds": seconds, "first_over_tenth": first / tenth}
        print(
            f"{name:>14}: first call {first * 1e3:9.1f} ms, call {min(10, len(seconds))} "
            f"{tenth * 1e3:8.1f} ms (first/that {first / tenth:.2f}), "
            f"best {min(seconds) * 1e3:.1f} ms = {args.tokens / min(seconds):.0f} tokens/s"
        )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
