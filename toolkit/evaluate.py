"""Evaluate a checkpoint: validation loss on a recipe's data, or lm-evaluation-harness tasks.

    python -m toolkit.evaluate --recipe R.toml --checkpoint runs/x/checkpoints [--split test]

The model comes from the checkpoint; the data (source or blend, split, seq_length, seed) and the
batch (train.micro_batch_size x train.eval_batches) from the recipe: with the recipe the run was
trained with, the number equals the run's last `valid/loss`.

    python -m toolkit.evaluate --checkpoint C --tasks hellaswag,arc_easy [--num-fewshot K]
        [--limit N] [--batch-size B] [--include-path DIR] [--output results.json]

runs lm-evaluation-harness tasks (pip install lm-eval; the tasks' datasets come from the Hugging
Face hub, or from local files for tasks defined in YAML under --include-path) on the checkpoint's
model and tokenizer (toolkit.lm_eval_adapter), prints lm-eval's results table and writes its JSON.
"""

import argparse
import json
import logging
import math
import sys
from functools import partial
from pathlib import Path

from toolkit.build import (
    build_blend,
    build_data,
    eod_masked,
    model_from_checkpoint,
    resolve_device,
    tokenizer_from_checkpoint,
)
from toolkit.checkpoint import CheckpointError, resolve_checkpoint
from toolkit.config import Recipe, RecipeError, load_recipe
from toolkit.data.sampler import Samples
from toolkit.inference.chat_template import chat_template_for
from toolkit.parallel.runtime import cross_entropy
from toolkit.precision import autocast_context
from toolkit.tokenizer import Tokenizer
from toolkit.validation import validation_loss

log = logging.getLogger("toolkit.evaluate")


def evaluation_samples(recipe: Recipe, tokenizer: Tokenizer, split: str) -> Samples:
    """The recipe's held-out samples: its valid (or, for a blend, test) split."""
    if recipe.data.blend:
        return eod_masked(build_blend(recipe, split), recipe, tokenizer)
    if split != "valid":
        raise RecipeError("data.source has only a valid part (data.valid_fraction), no test split")
    _, valid = build_data(recipe, tokenizer)
    if valid is None:
        raise RecipeError("data.valid_fraction is 0: there is no validation data to evaluate on")
    return valid


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, or a directory of them")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    loss = parser.add_argument_group("validation loss (with --recipe)")
    loss.add_argument("--recipe", help="recipe TOML naming the data")
    loss.add_argument("--split", choices=["valid", "test"], default="valid")
    loss.add_argument("--batches", type=int, help="micro-batches (default: train.eval_batches)")
    loss.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    loss.add_argument("--json", action="store_true", help="print one JSON object")
    harness = parser.add_argument_group("lm-evaluation-harness (with --tasks)")
    harness.add_argument("--tasks", help="comma-separated task, group or tag names (globs allowed)")
    harness.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    harness.add_argument("--limit", type=float, help="examples per task (below 1: a fraction)")
    harness.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    harness.add_argument("--include-path", help="a directory of extra task YAML files")
    harness.add_argument("--output", help="write lm-eval's results as JSON to this file")
    harness.add_argument(
        "--log-samples", action="store_true", help="with --output: every request and response"
    )
    harness.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16", "float64"],
        default="auto",
        help="auto: bfloat16 on a GPU, float32 otherwise",
    )
    harness.add_argument(
        "--bootstrap-iters", type=int, default=100000, help="for the stderr of some metrics"
    )
    harness.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="prompts (few-shot examples as turns) in the checkpoint's own chat template, the "
        "one beside its tokenizer file (an instruct model's, from checkpoints_tools/import_hf.py)",
    )
    harness.add_argument(
        "--system-instruction", help="a system message before each prompt (with the template)"
    )
    args = parser.parse_args(argv)
    if (args.recipe is None) == (args.tasks is None):
        parser.error("give --recipe (validation loss) or --tasks (lm-evaluation-harness), not both")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.tasks is not None:
        return evaluate_tasks(args)
    checkpoint = None
    try:
        recipe = load_recipe(args.recipe, args.set)
        device = resolve_device(args.device, "--device")
        checkpoint = resolve_checkpoint(args.checkpoint)  # not a checkpoint: bad input
        model, _, tokenizer = model_from_checkpoint(checkpoint, device)
        samples = evaluation_samples(recipe, tokenizer, args.split)
    except (RecipeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if checkpoint is None else 1  # a checkpoint, but damaged: a failure
    batches = args.batches or recipe.train.eval_batches
    loss = validation_loss(
        model,
        samples,
        partial(cross_entropy, vocab_size=model.vocab_size),
        batches=batches,
        micro_batch_size=recipe.train.micro_batch_size,
        autocast=lambda: autocast_context(recipe.train.precision, device),
        per_token=recipe.train.per_token_loss,
    )
    result = {
        "split": args.split,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "samples": batches * recipe.train.micro_batch_size,
        "seq_length": samples.seq_length,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.split} loss {loss:.4f} perplexity {result['perplexity']:.3f} "
            f"({result['samples']} samples of {samples.seq_length} tokens)"
        )
    return 0


def evaluate_tasks(args: argparse.Namespace) -> int:
    """--tasks: lm-eval's tasks on the checkpoint; inputs are checked before the model loads."""
    try:
        from toolkit import lm_eval_adapter as adapter
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        print(
            "error: --tasks needs lm-evaluation-harness, which is not installed: "
            "pip install lm-eval (or pip install -e .[eval])",
            file=sys.stderr,
        )
        return 1
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if not tasks:
            raise ValueError("--tasks names no task")
        checkpoint = resolve_checkpoint(args.checkpoint)
        # Before lm-eval's task index (~15 s) and the weights: the template beside the tokenizer.
        if args.apply_chat_template:
            if chat_template_for("auto", tokenizer_from_checkpoint(str(checkpoint))) is None:
                raise ValueError(f"--apply-chat-template: {adapter.NO_CHAT_TEMPLATE}")
        if args.include_path and not Path(args.include_path).is_dir():
            raise FileNotFoundError(f"--include-path {args.include_path}: no such directory")
        # lm-eval logs every task it indexes and every request it builds at INFO.
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        manager = adapter.task_manager(args.include_path)
        unknown = adapter.unknown_tasks(manager, tasks)
        if unknown:
            raise ValueError(
                f"unknown task(s): {', '.join(unknown)} (lm-eval knows {len(manager.all_tasks)} "
                "tasks, groups and tags: `lm-eval ls tasks` lists them; for tasks defined in "
                "local YAML files pass --include-path DIR)"
            )
        lm = adapter.HybridToolkitLM(
            args.checkpoint, batch_size=args.batch_size, device=args.device, dtype=args.dtype
        )
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = adapter.run_tasks(
        lm,
        tasks,
        manager,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        bootstrap_iters=args.bootstrap_iters,
        log_samples=args.log_samples,
        apply_chat_template=args.apply_chat_template,
        system_instruction=args.system_instruction,
    )
    print(adapter.results_table(results))
    if args.output:
        from lm_eval.utils import handle_non_serializable

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
