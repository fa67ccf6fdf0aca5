"""The one place that turns a recipe into objects: tokenizer, model, and a model from a checkpoint."""

import logging
from pathlib import Path
from typing import Any

import torch

from toolkit.checkpoint import (
    Comm,
    RankView,
    planned_writes,
    read_metadata,
    resolve_checkpoint,
    restore,
    snapshot,
    write_checkpoint,
)
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
    path = resolve_checkpoint(path)
    recipe = recipe_from_dict(read_metadata(path)["recipe"])
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    model = build_model(recipe, tokenizer, device)
    meta = restore(path, model, None, RankView(model.cfg, model.vocab_size))
    log.info("loaded %s (step %s)", path, meta.get("step"))
    return model.eval(), recipe, tokenizer


def checkpoint_metadata(
    recipe: Recipe, model: HybridLM, step: int, consumed_samples: int, layout: dict[str, int]
) -> dict[str, Any]:
    """The JSON metadata of a checkpoint: enough to rebuild the model and resume the data."""
    return {
        "step": step,
        "consumed_samples": consumed_samples,
        "recipe": recipe.to_dict(),
        "layout": layout,  # the writer's; readers may use any other
        "pattern": model.layout.pattern,
        "vocab_size": model.vocab_size,
    }


def save_model_checkpoint(
    root: str | Path,
    model: HybridLM,
    recipe: Recipe,
    step: int = 0,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Publish a single-process (unsharded) model as a checkpoint under `root`, with no optimizer
    state: what converters and importers write. Training can start from it (fine-tuning)."""
    layout = {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}
    meta = checkpoint_metadata(recipe, model, step, 0, layout) | (metadata or {})
    writes = snapshot(planned_writes(model, None, RankView(model.cfg, model.vocab_size)))
    return write_checkpoint(root, step, writes, meta, Comm())
