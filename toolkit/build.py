"""The one place that turns a recipe into objects: tokenizer, data, model, and a model from a
checkpoint."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
from toolkit.config import Recipe, RecipeError, recipe_from_dict
from toolkit.data import SequenceSampler, load_corpus
from toolkit.data.blend import BlendedSamples
from toolkit.data.index_cache import IndexCache
from toolkit.data.indexed import IndexedDataset, IndexedDatasetError
from toolkit.data.packed import SPLITS, PackedSamples, parse_split, split_ranges
from toolkit.data.sampler import Samples
from toolkit.distributed import ParallelEnv
from toolkit.model import HybridLM, count_parameters
from toolkit.parallel.parallelize import apply_tensor_parallel
from toolkit.tokenizer import Tokenizer, TokenizerError, build_tokenizer

log = logging.getLogger(__name__)


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' as a device of this machine; RecipeError naming `key`
    (the recipe key or flag it came from) for one this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RecipeError(
            f"{key}: {name!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{key}: {name!r}, but no CUDA device is available here: use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RecipeError(f"{key}: {name!r}, but this machine has {torch.cuda.device_count()} GPUs")
    return device


def build_model(
    recipe: Recipe,
    tokenizer: Tokenizer,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> HybridLM:
    """`dtype`: create the parameters in it directly, with no fp32 copy first (an 8B model's
    would be 35 GB); None: the default dtype."""
    vocab = recipe.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or default)
    try:
        with torch.device(device):
            return HybridLM(recipe.model, vocab_size=vocab, tp=recipe.parallel.tp)
    finally:
        torch.set_default_dtype(default)


def tokenizer_from_recipe(recipe: Recipe) -> Tokenizer:
    try:
        return build_tokenizer(recipe.data.tokenizer)
    except TokenizerError as e:
        raise RecipeError(f"data.tokenizer: {e}") from None


def build_data(recipe: Recipe, tokenizer: Tokenizer) -> tuple[Samples, Samples | None]:
    """The training samples and the validation samples (None without a validation split)."""
    train, valid = _splits(recipe, tokenizer)
    return eod_masked(train, recipe, tokenizer), valid and eod_masked(valid, recipe, tokenizer)


def eod_masked(samples: Samples, recipe: Recipe, tokenizer: Tokenizer) -> Samples:
    """`samples`, whose labels after the tokenizer's end of document take no part in the loss
    where data.eod_mask_loss asks for it."""
    if recipe.data.eod_mask_loss:
        samples.loss_mask_eod = tokenizer.eod
    return samples


def _splits(recipe: Recipe, tokenizer: Tokenizer) -> tuple[Samples, Samples | None]:
    d, seq, seed = recipe.data, recipe.model.seq_length, recipe.train.seed
    if not d.blend:
        try:
            tokens = load_corpus(d.source, tokenizer, d.max_corpus_bytes)
        except FileNotFoundError:
            raise RecipeError(f"data.source: {d.source!r} is not a file") from None
        if d.source == "stdlib":
            log.warning(
                "data: the embedded corpus (Python's standard library source, %d tokens) is a "
                "smoke test, not training data: give real data with data.blend and "
                "data.tokenizer (launchers/submit.py RECIPE --data PREFIX --tokenizer PATH)",
                len(tokens),
            )
        # The corpus's end is held out for validation: training never sees those tokens.
        held_out = int(len(tokens) * d.valid_fraction)
        train = SequenceSampler(tokens[: len(tokens) - held_out], seq, seed)
        return train, SequenceSampler(tokens[-held_out:], seq, seed) if held_out else None
    train = build_blend(recipe, "train")
    return train, build_blend(recipe, "valid") if d.validation_share() > 0 else None


def build_blend(recipe: Recipe, split: str) -> Samples:
    """One split ('train', 'valid' or 'test'): data.valid_blend or data.test_blend where the
    split has datasets of its own (each used whole), else data.split's share of data.blend;
    errors name the blend entry."""
    d = recipe.data
    own = {"valid": d.valid_blend, "test": d.test_blend}.get(split)
    key = f"data.{split}_blend" if own else "data.blend"
    shares, index = ([1.0, 0.0, 0.0], 0) if own else (parse_split(d.split), SPLITS.index(split))
    parts, weights = [], []
    for i, (weight, prefix) in enumerate(d.weighted_prefixes(own or d.blend)):
        try:
            dataset = IndexedDataset(prefix)
            cache = IndexCache(d.cache_dir or Path(prefix).parent / "index_cache")
            sequences = split_ranges(len(dataset), shares)[index]
            part = PackedSamples(
                dataset, sequences, recipe.model.seq_length, recipe.train.seed, cache, split
            )
        except (IndexedDatasetError, ValueError) as e:
            raise RecipeError(f"{key}[{i}]: {e}") from None
        parts.append(part)
        weights.append(weight)
    if len(parts) == 1:
        return parts[0]
    try:
        return BlendedSamples(parts, weights, IndexCache(d.cache_dir or parts[0].cache.directory))
    except ValueError as e:
        raise RecipeError(f"{key}: {e}") from None


def describe_model(model: HybridLM) -> str:
    counts = count_parameters(model)
    return (
        f"{model.layout.summary()}\nparameters: {counts['total']:,} "
        f"({counts['total'] / 1e9:.3f}B; {counts['matmul']:,} in matmuls), "
        f"vocab {model.vocab_size} padded to {model.padded_vocab_size}"
    )


def checkpoint_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe a checkpoint (root or step directory) was saved with (checkpoint_metadata's),
    with `overrides` ("key=value") applied and checked: RecipeError names a key that does not
    fit."""
    return recipe_from_dict(read_metadata(path)["recipe"], list(overrides))


def tokenizer_from_checkpoint(path: str) -> Tokenizer:
    """The tokenizer a checkpoint's recipe names, without reading its weights."""
    return tokenizer_from_recipe(checkpoint_recipe(path))


def model_from_checkpoint(
    path: str, device: torch.device | str = "cpu", *, env: ParallelEnv | None = None
) -> tuple[HybridLM, Recipe, Tokenizer]:
    """Rebuild the model a checkpoint was trained with (its recipe is in the metadata): the whole
    model on `device`, or with `env` (TP > 1) this rank's tensor-parallel shard on env.device,
    built on the meta device, sharded, then filled with only the slices the rank owns (a rank
    never holds the whole model)."""
    path = resolve_checkpoint(path)
    tp = 1 if env is None else env.tp
    # A shard's TP sets the vocabulary padding and is checked against the model's heads.
    overrides = [f"parallel.tp={tp}"] if tp > 1 else []
    recipe = checkpoint_recipe(path, overrides)
    tokenizer = tokenizer_from_recipe(recipe)
    if tp == 1:
        model = build_model(recipe, tokenizer, device)
        view = RankView(model.cfg, model.vocab_size)
    else:
        with _parameters_on_meta():
            model = build_model(recipe, tokenizer, "cpu")
        apply_tensor_parallel(model, env)  # parallelize.py's TP step, as training takes it
        _materialize(model, env.device)
        view = RankView(model.cfg, model.vocab_size, tp, env.tp_rank, 0, env.rank)
    step = restore(path, model, None, view).get("step")
    if tp == 1:
        log.info("loaded %s (step %s)", path, step)
    else:
        log.info("loaded TP shard %d/%d of %s (step %s)", view.tp_rank, tp, path, step)
    return model.eval(), recipe, tokenizer


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside keep their parameters on the meta device (no memory, no init) and
    their buffers (rotary frequencies) real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Real parameters for the meta ones (keeping their sharding attributes), then everything
    on `device`: zeros, since padding rows of the vocabulary are not in the checkpoint."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                real = nn.Parameter(torch.zeros_like(param, device=device), requires_grad=False)
                real.__dict__.update(param.__dict__)
                module._parameters[name] = real
    model.to(device)


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
