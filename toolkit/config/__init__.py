"""The recipe: one TOML file drives model, data, training, parallel layout, checkpoints, logging, Slurm.

`load_recipe(path, overrides)` parses, type-checks and validates; every error names the key and
the reason, e.g. ``recipes/x.toml: model.hidden_size: expected int, got str 'big'``.

One module per concern, all re-exported here (`from toolkit.config import X`):
- base.py: RecipeError and the field helpers; ranges.py: RANGES, the run name
- model.py, training.py (train, data), job.py (parallel, checkpoint, logging, slurm): the sections
  each section validates its own keys (`ModelConfig.validate`, ...)
- recipe.py: the whole Recipe, `validate` (the sections, then the checks across them) and the key
  reference; layout_check.py: the one check of TP x PP x DP against the model and the world size
- load.py: TOML and `--set` overrides; cli.py: `python -m toolkit.config`
"""

from toolkit.config.base import RecipeError, opt, req
from toolkit.config.job import (
    CheckpointConfig,
    LoggingConfig,
    ParallelConfig,
    SlurmConfig,
    job_environment,
    slurm_seconds,
    tasks_per_node,
)
from toolkit.config.layout_check import check_layout, default_world_size, parallel_degrees
from toolkit.config.load import add_recipe_arguments, apply_override, load_recipe, recipe_from_dict
from toolkit.config.model import MLP_ACTIVATIONS, MlpActivation, ModelConfig, padded_vocab_size
from toolkit.config.ranges import INT64_MAX, MAX_SIZE, NAME, RANGES, check_name, check_ranges
from toolkit.config.recipe import Recipe, describe_keys, validate
from toolkit.config.training import (
    BLOCK_KINDS,
    FP8_RECIPES,
    TE_AMAX_HISTORY,
    DataConfig,
    Fp8Engine,
    Fp8Layers,
    Fp8Recipe,
    Precision,
    ProfileConfig,
    TrainConfig,
)

__all__ = [
    "BLOCK_KINDS",
    "FP8_RECIPES",
    "INT64_MAX",
    "MAX_SIZE",
    "MLP_ACTIVATIONS",
    "NAME",
    "RANGES",
    "TE_AMAX_HISTORY",
    "CheckpointConfig",
    "DataConfig",
    "Fp8Engine",
    "Fp8Layers",
    "Fp8Recipe",
    "LoggingConfig",
    "MlpActivation",
    "ModelConfig",
    "ParallelConfig",
    "Precision",
    "ProfileConfig",
    "Recipe",
    "RecipeError",
    "SlurmConfig",
    "TrainConfig",
    "add_recipe_arguments",
    "apply_override",
    "check_layout",
    "check_name",
    "check_ranges",
    "default_world_size",
    "describe_keys",
    "job_environment",
    "load_recipe",
    "opt",
    "padded_vocab_size",
    "parallel_degrees",
    "recipe_from_dict",
    "req",
    "slurm_seconds",
    "tasks_per_node",
    "validate",
]
