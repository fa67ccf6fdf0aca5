"""How long `toolkit.inference.generate` takes on its first call against later calls: the sample
printed at the end of training (train.sample_prompt: 200 tokens, temperature 0.7, top-k 20,
through `toolkit.train.sample_text`) and a greedy generation, each called `--calls` times.

With `--train-steps N` (default 3) the model is the trainer's (`toolkit.train.Trainer`: its
set-up, the decode warm-up included, then N of its steps on the recipe's data), so the closing
sample is timed where it really runs: after training, which warms the prefill's kernels but not
the decode step's. With `--train-steps 0` the model is only built, in a fresh process: the first
call pays what no later one does (cuBLAS handles, Triton kernels compiled or read from the cache,
the first CUDA graph capture); `--warm-up on` then warms as `python -m toolkit.inference.generate`
does after loading. Every call records its own CUDA graphs.

    python benchmarks/generate_warm.py --recipe recipes/tiny_hybrid.toml --device cuda \\
        --train-steps 3 --json warm.json
"""

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import synchronize, write_json  # noqa: E402

from toolkit.build import build_model, resolve_device  # noqa: E402
from toolkit.config import Recipe, RecipeError, load_recipe  # noqa: E402
from toolkit.inference.generate import generate, warm_up  # noqa: E402
from toolkit.model import HybridLM  # noqa: E402
from toolkit.tokenizer import build_tokenizer  # noqa: E402
from toolkit.train import SAMPLE_TEMPERATURE, SAMPLE_TOP_K, Trainer, sample_text  # noqa: E402


def timed(fn, device: torch.device) -> float:
    """Seconds one call of `fn()` takes, the device's queue drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def sm_clock_mhz(device: torch.device) -> int | None:
    """The GPU's SM clock now (MHz, from nvidia-smi), None off CUDA or without nvidia-smi: a GPU
    left idle drops its clock, and a host-bound first call after the idle can pay for the ramp."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    query = [
        "nvidia-smi",
        "-i",
        str(index),
        "--query-gpu=clocks.sm",
        "--format=csv,noheader,nounits",
    ]
    try:
        return int(subprocess.run(query, capture_output=True, text=True, timeout=10).stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def trained_model(recipe: Recipe, steps: int, warm: str) -> tuple[HybridLM, float | None]:
    """The model after the trainer's set-up and `steps` of its steps, and the seconds its decode
    warm-up took (None: none ran; `warm` 'on' forces it on the CPU, 'off' skips it)."""
    trainer = Trainer(recipe, force_warm_up=warm == "on")
    trainer.module.train()
    for _ in range(steps):
        trainer.train_step()
    return trainer.model, trainer.decode_warm_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="recipes/tiny_hybrid.toml", help="model recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="parameters' dtype with --train-steps 0 (default: bfloat16 on CUDA, "
                        "float32 on CPU); the trainer's model has the recipe's")  # fmt: skip
    parser.add_argument("--train-steps", type=int, default=3, metavar="N",
                        help="training steps before the timed calls (default 3; 0: the model "
                        "only built, in a fresh process)")  # fmt: skip
    parser.add_argument("--warm-up", choices=("auto", "on", "off"), default="auto",
                        help="the decode warm-up: auto (default) as the toolkit does, i.e. the "
                        "trainer's on GPUs with --train-steps, none with 0; on: also on the CPU, "
                        "and with 0 as the generate CLI does; off: none")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=200, help="new tokens a call (default 200)")
    parser.add_argument("--calls", type=int, default=10, help="calls of each kind (default 10)")
    parser.add_argument("--prompt", default="def main(", help="the prompt")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.calls < 2 or args.train_steps < 0:
        parser.error("--tokens must be >= 1, --calls >= 2 and --train-steps >= 0")
    if args.train_steps and args.dtype:
        parser.error("--dtype is for --train-steps 0: the trainer builds the recipe's model")
    try:
        device = resolve_device(args.device, "--device")
        # The trainer warms for train.sample_prompt: the prompt timed here, or none ('off').
        prompt = "" if args.warm_up == "off" else args.prompt
        trainer_keys = [f"train.device={json.dumps(device.type)}", "checkpoint.enabled=false",
                        f"train.sample_prompt={json.dumps(prompt)}"]  # fmt: skip
        recipe = load_recipe(args.recipe, args.set + (trainer_keys if args.train_steps else []))
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    ids = torch.tensor([tokenizer.encode(args.prompt)])
    start = time.perf_counter()
    if args.train_steps:
        model, warmed = trained_model(recipe, args.train_steps, args.warm_up)
    else:
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        torch.manual_seed(0)
        model = build_model(recipe, tokenizer, device, dtype).eval()
        warmed = None
        if args.warm_up == "on":  # as the generate CLI does with several prompts (both kinds)
            warmed = warm_up(model, ids, args.tokens, temperature=SAMPLE_TEMPERATURE,
                             top_k=SAMPLE_TOP_K, eod_id=tokenizer.eod, force=True)  # fmt: skip
    built = time.perf_counter() - start
    # The trainer's device is cuda:<local rank> (train.device takes no index).
    device, dtype = model.embedding.weight.device, model.embedding.weight.dtype

    kinds = {
        "closing_sample": lambda: sample_text(
            model, tokenizer, args.prompt, seed=0, max_new_tokens=args.tokens
        ),
        "greedy": lambda: generate(model, ids, args.tokens),
    }
    result = {"recipe": args.recipe, "device": str(device), "dtype": str(dtype),
              "tokens": args.tokens, "train_steps": args.train_steps, "warm_up": args.warm_up,
              "model_ready_s": built, "decode_warm_s": warmed}  # fmt: skip
    warm_note = "no decode warm-up" if warmed is None else f"decode path warmed in {warmed:.2f} s"
    print(f"{args.recipe} on {device} ({dtype}) after {args.train_steps} training steps: "
          f"model ready in {built:.2f} s, {warm_note}")  # fmt: skip
    for name, fn in kinds.items():
        seconds, clocks = [], []
        for _ in range(args.calls):
            clocks.append(sm_clock_mhz(device))  # before the call, outside its time
            seconds.append(timed(fn, device))
        first, tenth = seconds[0], seconds[min(9, len(seconds) - 1)]
        result[name] = {"seconds": seconds, "first_over_tenth": first / tenth,
                        "sm_clock_mhz_before": clocks}  # fmt: skip
        print(
            f"{name:>14}: first call {first * 1e3:9.1f} ms, call {min(10, len(seconds))} "
            f"{tenth * 1e3:8.1f} ms (first/that {first / tenth:.2f}), "
            f"best {min(seconds) * 1e3:.1f} ms = {args.tokens / min(seconds):.0f} tokens/s"
        )
        print(f"{'':>14}  calls (ms): {' '.join(f'{t * 1e3:.0f}' for t in seconds)}")
        if clocks[0] is not None:
            print(f"{'':>14}  SM clock before each (MHz): {' '.join(map(str, clocks))}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
