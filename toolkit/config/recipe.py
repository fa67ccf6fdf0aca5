"""The whole recipe: its sections, and the reference of every key (`--keys`)."""

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from toolkit.config.base import opt, req, type_name
from toolkit.config.job import CheckpointConfig, LoggingConfig, ParallelConfig, SlurmConfig
from toolkit.config.model import ModelConfig
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
