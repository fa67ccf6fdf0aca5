"""The one place that turns a recipe into objects: tokenizer, model, and a model from a checkpoint."""

import logging
from pathlib import Path
from typing import Any

import torch

from toolkit.checkpoint import load_checkpoint, model_tensors, restore_model, save_checkpoint
from toolkit.config import Recipe, recipe_from_dict
from toolkit.model import HybridLM, count_parameters
from toolkit.tokenizer import ByteTokenizer, build_tokenizer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available here")
    return torch.device(name)


def build_model(
    recipe: Recipe, tokenizer: ByteTokenizer, device: torch.device | str = "cpu"
) -> HybridLM:
    vocab = recipe.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    with torch.device(device):
        return HybridLM(recipe.model, vocab_size=vocab, tp=recipe.parallel.tp)


def describe_model(model: HybridLM) -> str:
    counts = count_parameters(model)
    return (
        f"{model.layout.summary()}\nparameters: {counts['total']:,} "
        f"({counts['total'] / 1e9:.3f}B; {counts['matmul']:,} in matmuls), "
        f"vocab {model.vocab_size} padded to {model.padded_vocab_size}"
    )


def model_from_checkpoint(
    path: str, device: torch.device | str = "cpu"
) -> tuple[HybridLM, Recipe, ByteTokenizer]:
    """Rebuild the model a checkpoint was trained with (its recipe is in the metadata)."""
    ckpt = load_checkpoint(path)
    recipe = recipe_from_dict(ckpt.metadata["recipe"])
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    model = build_model(recipe, tokenizer, device)
    restore_model(model, ckpt)
    log.info("loaded %s (step %s)", ckpt.path, ckpt.metadata.get("step"))
    return model.eval(), recipe, tokenizer


def save_model_checkpoint(
    root: str | Path,
    model: HybridLM,
    recipe: Recipe,
    step: int = 0,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Publish a single-process (unsharded) model as a checkpoint under `root`, with no optimizer
    state: what converters and importers write. Training can start from it (fine-tuning)."""
    meta = {
        "step": step,
        "consumed_samples": 0,
        "recipe": recipe.to_dict(),
        "layout": {"tp": 1, "pp": 1, "dp": 1},
        "pattern": model.layout.pattern,
        "vocab_size": model.vocab_size,
        **(metadata or {}),
    }
    return save_checkpoint(root, step, model_tensors(model), {}, meta)
