"""Loss and perplexity of a checkpoint on a recipe's validation (or test) data.

    python -m toolkit.evaluate --recipe R.toml --checkpoint runs/x/checkpoints [--split test]

The model comes from the checkpoint; the data (source or blend, split, seq_length, seed) and the
batch (train.micro_batch_size x train.eval_batches) from the recipe: with the recipe the run was
trained with, the number equals the run's last `valid/loss`.
"""

import argparse
import json
import logging
import math
import sys

import torch

from toolkit.build import build_blend, build_data, model_from_checkpoint, resolve_device
from toolkit.config import Recipe, RecipeError, load_recipe
from toolkit.data.sampler import Samples
from toolkit.model import HybridLM
from toolkit.parallel.runtime import cross_entropy
from toolkit.tokenizer import Tokenizer
from toolkit.train import autocast_context

log = logging.getLogger("toolkit.evaluate")


def evaluation_samples(recipe: Recipe, tokenizer: Tokenizer, split: str) -> Samples:
    """The recipe's held-out samples: its valid (or, for a blend, test) split."""
    if recipe.data.blend:
        return build_blend(recipe, split)
    if split != "valid":
        raise RecipeError("data.source has only a valid part (data.valid_fraction), no test split")
    _, valid = build_data(recipe, tokenizer)
    if valid is None:
        raise RecipeError("data.valid_fraction is 0: there is no validation data to evaluate on")
    return valid


@torch.no_grad()
def mean_loss(
    model: HybridLM, samples: Samples, batches: int, micro_batch: int, precision: str
) -> float:
    """Mean cross-entropy (nats per token) over the first `batches` micro-batches of samples."""
    device = next(model.parameters()).device
    total = 0.0
    for i in range(batches):
        inputs, labels = samples.batch(i * micro_batch, micro_batch)
        with autocast_context(precision, device):
            logits = model(inputs.to(device))
        total += cross_entropy(logits, labels.to(device), model.vocab_size).item()
    return total / batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", required=True, help="recipe TOML naming the data")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, or a directory of them")
    parser.add_argument("--split", choices=["valid", "test"], default="valid")
    parser.add_argument("--batches", type=int, help="micro-batches (default: train.eval_batches)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.set)
        model, _, tokenizer = model_from_checkpoint(args.checkpoint, resolve_device(args.device))
        samples = evaluation_samples(recipe, tokenizer, args.split)
    except (RecipeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batches = args.batches or recipe.train.eval_batches
    loss = mean_loss(model, samples, batches, recipe.train.micro_batch_size, recipe.train.precision)
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


if __name__ == "__main__":
    raise SystemExit(main())
