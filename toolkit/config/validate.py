"""Validation of values that types cannot express: divisibility, the layout, the world size."""

import math
from typing import Any

from toolkit.config.base import RecipeError
from toolkit.config.base import check as _check
from toolkit.config.job import SlurmConfig
from toolkit.config.model import ModelConfig
from toolkit.config.ranges import check_name, check_ranges
from toolkit.config.recipe import Recipe
from toolkit.config.training import DataConfig
from toolkit.layout import LayerLayout, build_layout


def validate(r: Recipe, world_size: int | None = None) -> None:
    """Raise RecipeError for an impossible recipe; with world_size, also check the layout fits it."""
    check_ranges(r)  # first: what follows computes and allocates from these numbers
    check_name(r.name)
    for key, value in (("checkpoint.dir", r.checkpoint.dir), ("logging.dir", r.logging.dir)):
        _check(value.strip() != "", key, "must be a directory path, got an empty string")
    layout = _validate_model(r.model)
    _validate_parallel(r, layout)
    _validate_train(r)
    _validate_slurm(r.slurm)
    check_supported(r)
    _validate_world_size(r, world_size)  # last: the recipe fits no job, or not this one


def check_supported(r: Recipe) -> None:
    """Combinations of valid settings that the code does not implement yet, refused here rather
    than failing once the job runs: the one place to lift each when its implementation lands.
    (With train.fp8_engine='auto' the engine is known only where the job runs: there
    parallelize.apply_float8 refuses the same combination.)"""
    t = r.train
    _check(
        not (
            t.precision == "fp8"
            and t.fp8_engine == "transformer_engine"
            and t.activation_checkpointing not in ("none", False, [])
        ),
        "train.activation_checkpointing",
        "with Transformer Engine's fp8 is not supported yet (checkpointing recomputes outside "
        "its autocast): use train.activation_checkpointing='none' or train.fp8_engine='torchao'",
    )


def _validate_model(m: ModelConfig) -> LayerLayout:
    """The layer layout and the block shapes; returns the layout."""
    _check(
        m.att_ratio + m.mlp_ratio <= 1 + 1e-9,
        "model.mlp_ratio",
        "att_ratio + mlp_ratio must be <= 1",
    )
    try:
        layout = build_layout(m.num_layers, m.att_ratio, m.mlp_ratio, m.pattern)
    except ValueError as e:
        key = "model.pattern" if m.pattern is not None else "model.att_ratio / model.mlp_ratio"
        raise RecipeError(f"{key}: {e}") from None
    if "*" in layout.pattern:
        h, g = m.num_attention_heads, m.num_query_groups
        _check(h % g == 0, "model.num_query_groups", f"{h} heads are not divisible by {g} groups")
        _check(
            m.hidden_size % h == 0,
            "model.num_attention_heads",
            f"hidden_size {m.hidden_size} is not divisible by {h} heads",
        )
    if "M" in layout.pattern:
        d_inner = m.mamba_expand * m.hidden_size
        _check(
            d_inner % m.mamba_head_dim == 0,
            "model.mamba_head_dim",
            f"d_inner {d_inner} is not divisible by head dim {m.mamba_head_dim}",
        )
        heads = d_inner // m.mamba_head_dim
        _check(
            heads % m.mamba_num_groups == 0,
            "model.mamba_num_groups",
            f"{heads} Mamba heads are not divisible by {m.mamba_num_groups} groups",
        )
    return layout


def _validate_parallel(r: Recipe, layout: LayerLayout) -> None:
    """Tensor parallelism splits heads, groups and the FFN; pipeline stages split the layers."""
    m, p, tp = r.model, r.parallel, r.parallel.tp
    if "*" in layout.pattern:
        h, g = m.num_attention_heads, m.num_query_groups
        _check(h % tp == 0, "parallel.tp", f"{h} attention heads are not divisible by TP={tp}")
        _check(g % tp == 0, "parallel.tp", f"{g} query groups are not divisible by TP={tp}")
    if "M" in layout.pattern:
        heads = m.mamba_expand * m.hidden_size // m.mamba_head_dim
        _check(heads % tp == 0, "parallel.tp", f"{heads} Mamba heads are not divisible by TP={tp}")
        _check(
            m.mamba_num_groups % tp == 0,
            "parallel.tp",
            f"{m.mamba_num_groups} Mamba groups are not divisible by TP={tp}",
        )
    if "-" in layout.pattern:
        _check(
            m.ffn_size % tp == 0,
            "parallel.tp",
            f"ffn size {m.ffn_size} is not divisible by TP={tp}",
        )
    if p.sequence_parallel:
        _check(
            m.seq_length % tp == 0,
            "parallel.sequence_parallel",
            f"model.seq_length {m.seq_length} does not split into TP={tp} equal parts",
        )
    stages = len(layout.stages)
    if stages > 1:
        _check(
            stages == p.pp, "parallel.pp", f"the pattern has {stages} stages ('|'), pp is {p.pp}"
        )
    else:
        _check(
            m.num_layers % p.pp == 0,
            "parallel.pp",
            f"{m.num_layers} layers do not split evenly into PP={p.pp} stages (or use '|' markers)",
        )


def _validate_train(r: Recipe) -> None:
    """Switches, the learning rates and the validation split."""
    t = r.train
    _check_block_kinds(
        t.activation_checkpointing, "train.activation_checkpointing", ("none", "full")
    )
    _check_block_kinds(t.compile, "train.compile", (False, True))
    if t.precision == "fp8":
        _check(
            not (t.fp8_engine == "torchao" and t.fp8_recipe == "delayed"),
            "train.fp8_recipe",
            "'delayed' is Transformer Engine's recipe (torchao has no delayed scaling): use "
            "'tensorwise' or 'rowwise', or train.fp8_engine='transformer_engine'",
        )
        _check(
            not (t.fp8_engine == "transformer_engine" and t.fp8_recipe == "rowwise"),
            "train.fp8_recipe",
            "'rowwise' is torchao's recipe: use 'tensorwise' or 'delayed' with Transformer "
            "Engine, or train.fp8_engine='torchao'",
        )
    valid_share = _validate_blend(r.data)
    _check(
        t.eval_interval == 0 or r.data.valid_fraction > 0 or valid_share > 0,
        "train.eval_interval",
        "needs a validation split: set data.valid_fraction (e.g. 0.01), or with data.blend a "
        "valid share in data.split",
    )
    _check(
        t.min_lr <= t.lr,
        "train.min_lr",
        f"need 0 <= min_lr <= lr, got {t.min_lr}, {t.lr}",
    )


def _validate_world_size(r: Recipe, world_size: int | None) -> None:
    """TP x PP x DP against the ranks, and the global batch against micro-batch x DP."""
    t, p, tp = r.train, r.parallel, r.parallel.tp
    dp = p.dp
    if dp == -1 and world_size is not None:
        _check(
            world_size % (tp * p.pp) == 0,
            "parallel",
            f"world size {world_size} is not divisible by TP x PP = {tp * p.pp}",
        )
        dp = world_size // (tp * p.pp)
    elif world_size is not None:
        _check(
            world_size == tp * p.pp * dp,
            "parallel",
            f"TP x PP x DP = {tp}x{p.pp}x{dp} = {tp * p.pp * dp} but the world size is {world_size}",
        )
    per_step = t.micro_batch_size * max(dp, 1)
    _check(
        t.global_batch_size % per_step == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not divisible by micro_batch_size x DP = {per_step}",
    )


def _validate_slurm(s: SlurmConfig) -> None:
    """What no cluster could run (slurm.time, signal_delay_s, ranks per GPU): caught here, when
    the recipe is checked, rather than at submission."""
    from toolkit.slurm import check_job  # local: toolkit.slurm imports this module

    check_job(s)


BLOCK_KINDS = {"mamba": "M", "attention": "*", "mlp": "-"}  # recipe name -> pattern symbol


def _check_block_kinds(value: Any, key: str, allowed: tuple[Any, Any]) -> None:
    """A per-block-kind switch: `allowed` (off, on) or a list of block kinds."""
    if isinstance(value, list):
        for i, kind in enumerate(value):
            _check(
                isinstance(kind, str) and kind in BLOCK_KINDS,
                f"{key}[{i}]",
                f"{kind!r} is not a block kind; use {', '.join(map(repr, BLOCK_KINDS))}",
            )
        return
    _check(
        value in allowed and type(value) is type(allowed[0]),
        key,
        f"expected {' or '.join(map(repr, allowed))} or a list of block kinds "
        f"({', '.join(map(repr, BLOCK_KINDS))}), got {value!r}",
    )


def _validate_blend(d: DataConfig) -> float:
    """Check data.blend and data.split; returns the validation share of a blend (0 without)."""
    from toolkit.data.packed import parse_split  # local: the data package is not always needed

    for i, e in enumerate(d.blend):
        pair = (
            isinstance(e, list)
            and len(e) == 2
            and isinstance(e[0], int | float)
            and not isinstance(e[0], bool)
            and isinstance(e[1], str)
        )
        _check(
            isinstance(e, str) or pair,
            f"data.blend[{i}]",
            f'expected [weight, "prefix"] or "prefix", got {e!r}',
        )
        _check(
            isinstance(e, str) or (math.isfinite(e[0]) and e[0] >= 0),
            f"data.blend[{i}]",
            f"weight must be a finite number >= 0, got {e[0] if pair else e!r}",
        )
    if not d.blend:
        return 0.0
    weights = [w for w, _ in d.weighted_prefixes()]
    _check(sum(weights) > 0, "data.blend", f"weights must sum to a positive number, got {weights}")
    _check(d.source == "stdlib", "data.source", "set either data.source or data.blend, not both")
    _check(
        d.valid_fraction == 0,
        "data.valid_fraction",
        "applies to data.source; a blend's validation share is in data.split",
    )
    try:
        return parse_split(d.split)[1]
    except ValueError as e:
        raise RecipeError(f"data.split: {e}") from None
