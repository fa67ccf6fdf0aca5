"""The whole recipe: its sections, its validation, and the reference of every key (`--keys`).

Each section validates its own keys (`ModelConfig.validate`, ...); `validate` here runs them in
the recipe's order, then the checks across sections, the parallel layout last.
"""

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from toolkit.config.base import check, opt, req, type_name
from toolkit.config.job import CheckpointConfig, LoggingConfig, ParallelConfig, SlurmConfig
from toolkit.config.layout_check import check_layout
from toolkit.config.model import ModelConfig
from toolkit.config.ranges import check_name
from toolkit.config.training import DataConfig, TrainConfig


@dataclass(kw_only=True, slots=True)
class Recipe:
    name: str = opt("run", "run name")
    model: ModelConfig = req("model shape")
    data: DataConfig = opt(None, "data")
    train: TrainConfig = req("training")
    parallel: ParallelConfig = opt(None, "parallel layout")
    checkpoint: CheckpointConfig = opt(None, "checkpointing")
    logging: LoggingConfig = opt(None, "logging")
    slurm: SlurmConfig = opt(None, "Slurm job")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sections(self) -> tuple[Any, ...]:
        """Every section in the recipe's order; each has its validate()."""
        return (
            self.model,
            self.data,
            self.train,
            self.parallel,
            self.checkpoint,
            self.logging,
            self.slurm,
        )


WorldSize = int | Literal["slurm"] | None  # the ranks to check the layout against


def validate(r: Recipe, world_size: WorldSize = None) -> None:
    """Raise RecipeError for an impossible recipe; with world_size, also check the layout fits it
    ('slurm': the ranks of the job the slurm section asks for, nodes x tasks per node)."""
    check_name(r.name)
    for section in r.sections():
        section.validate()  # its ranges first: what follows computes from these numbers
    check(
        r.train.eval_interval == 0 or r.data.validation_share() > 0,
        "train.eval_interval",
        "needs a validation split: set data.valid_fraction (e.g. 0.01), or with data.blend a "
        "valid share in data.split",
    )
    check(
        not r.train.step_graph or (r.parallel.tp == 1 and r.parallel.pp == 1),
        "train.step_graph",
        f"captures one GPU's whole step: needs parallel.tp=1 and parallel.pp=1, got "
        f"tp={r.parallel.tp} pp={r.parallel.pp}",
    )
    if world_size == "slurm":
        world_size = r.slurm.world_size
    check_layout(r, world_size)  # last: the recipe fits no job, or not this one


def describe_keys() -> str:
    """Every recipe key with its type, default and help: the reference for writing recipes."""
    lines = []
    for section in dataclasses.fields(Recipe):
        cls = typing.get_type_hints(Recipe)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        lines.append(f"[{section.name}]")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "required"
            kind = type_name(hints[f.name]).replace("typing.", "")
            lines.append(f"  {f.name} ({kind}, {default}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
