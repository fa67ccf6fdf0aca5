"""The one check of the parallel layout across sections: TP, PP and DP against the model's heads,
groups, FFN and layers, the world size and the global batch.

Config validation, the trainer (against the ranks it really got), `toolkit.distributed` (its
`resolve_layout`) and the launchers (against the Slurm job's nodes x tasks per node) all go
through here, so each fact has one wording.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from toolkit.config.base import check

if TYPE_CHECKING:
    from toolkit.config.job import ParallelConfig
    from toolkit.config.model import ModelConfig
    from toolkit.config.recipe import Recipe


def parallel_degrees(p: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(tp, pp, dp) on `world_size` ranks; parallel.dp=-1 takes what TP x PP leaves."""
    tp, pp = p.tp, p.pp
    if p.dp == -1:
        check(
            world_size % (tp * pp) == 0,
            "parallel",
            f"world size {world_size} is not divisible by TP x PP = {tp * pp}",
        )
        return tp, pp, world_size // (tp * pp)
    check(
        world_size == tp * pp * p.dp,
        "parallel",
        f"TP x PP x DP = {tp}x{pp}x{p.dp} = {tp * pp * p.dp} but the world size is {world_size}",
    )
    return tp, pp, p.dp


def check_layout(r: Recipe, world_size: int | None = None) -> None:
    """RecipeError for a layout the model or the job cannot take: TP must divide the heads, the
    groups and the FFN (and the sequence, with sequence parallelism), PP the layers or the
    pattern's stages; with `world_size`, TP x PP x DP must make the world size. The global batch
    must split into micro-batches over DP (DP counts 1 while dp=-1 and the world size unknown).
    Expects sections that passed their own validate()."""
    layout = r.model.layer_layout()
    _check_tensor_parallel(r.model, r.parallel, layout.pattern)
    _check_pipeline(r.model, r.parallel, len(layout.stages))
    dp = r.parallel.dp if world_size is None else parallel_degrees(r.parallel, world_size)[2]
    t = r.train
    check(
        t.compile_scope == "block" or r.parallel.tp == r.parallel.pp == 1,
        "train.compile_scope",
        f"'model' runs at TP=1 and PP=1 only (the pipeline runs stages, TP's collectives would "
        f"split the region); got TP={r.parallel.tp} PP={r.parallel.pp}: use 'block'",
    )
    per_step = t.micro_batch_size * max(dp, 1)
    check(
        t.global_batch_size % per_step == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not divisible by micro_batch_size x DP = {per_step}",
    )


def _check_tensor_parallel(m: ModelConfig, p: ParallelConfig, pattern: str) -> None:
    """Tensor parallelism splits attention heads and groups, Mamba heads and groups, the FFN."""
    tp = p.tp
    if "*" in pattern:
        h, g = m.num_attention_heads, m.num_query_groups
        check(h % tp == 0, "parallel.tp", f"{h} attention heads are not divisible by TP={tp}")
        check(g % tp == 0, "parallel.tp", f"{g} query groups are not divisible by TP={tp}")
    if "M" in pattern:
        heads = m.mamba_heads
        check(heads % tp == 0, "parallel.tp", f"{heads} Mamba heads are not divisible by TP={tp}")
        check(
            m.mamba_num_groups % tp == 0,
            "parallel.tp",
            f"{m.mamba_num_groups} Mamba groups are not divisible by TP={tp}",
        )
    if "-" in pattern:
        check(
            m.ffn_size % tp == 0,
            "parallel.tp",
            f"ffn size {m.ffn_size} is not divisible by TP={tp}",
        )
    if p.sequence_parallel:
        check(
            m.seq_length % tp == 0,
            "parallel.sequence_parallel",
            f"model.seq_length {m.seq_length} does not split into TP={tp} equal parts",
        )


def _check_pipeline(m: ModelConfig, p: ParallelConfig, stages: int) -> None:
    """Pipeline stages: the pattern's '|' markers, else an even split of the layers."""
    if stages > 1:
        check(stages == p.pp, "parallel.pp", f"the pattern has {stages} stages ('|'), pp is {p.pp}")
    else:
        check(
            m.num_layers % p.pp == 0,
            "parallel.pp",
            f"{m.num_layers} layers do not split evenly into PP={p.pp} stages (or use '|' markers)",
        )


def default_world_size(recipe: Recipe) -> int:
    """The ranks a recipe's job gets: its Slurm GPUs, or TP x PP x DP when DP is fixed."""
    p = recipe.parallel
    if p.dp != -1:
        return p.tp * p.pp * p.dp
    return max(recipe.slurm.world_size, p.tp * p.pp)
