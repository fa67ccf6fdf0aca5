"""The values each numeric recipe field may take (RANGES), and the run name's shape.

Checked before anything is computed from these numbers: a typo such as 1e9 layers stops here,
not in an allocation.
"""

import dataclasses
import math
import re
import types
import typing
from typing import Any

from toolkit.config.base import check, shown
from toolkit.layout import MAX_LAYERS

MAX_SIZE = 2**24  # cap on widths, lengths and batches: absurd sizes stop here, not in allocation
INT64_MAX = 2**63 - 1  # TOML integers are 64-bit; tomllib reads longer ones

# Every numeric recipe field and the values it may take: intervals ("inf": unbounded) or single
# numbers, joined by " or ". Floats must also be finite. Checked before anything is computed from
# them; test_config checks that every numeric field is here.
RANGES = {
    "model.num_layers": f"[1, {MAX_LAYERS}]",
    "model.hidden_size": f"[1, {MAX_SIZE}]",
    "model.seq_length": f"[1, {MAX_SIZE}]",
    "model.att_ratio": "[0, 1]",
    "model.mlp_ratio": "[0, 1]",
    "model.num_attention_heads": f"[1, {MAX_SIZE}]",
    "model.num_query_groups": f"[1, {MAX_SIZE}]",
    "model.ffn_hidden_size": f"[0, {MAX_SIZE}]",
    "model.norm_eps": "[0, inf)",
    "model.rotary_percent": "(0, 1]",
    "model.rotary_base": "(0, inf)",
    "model.vocab_size": f"[1, {MAX_SIZE}]",
    "model.make_vocab_size_divisible_by": f"[1, {MAX_SIZE}]",
    "model.mamba_state_dim": f"[1, {MAX_SIZE}]",
    "model.mamba_head_dim": f"[1, {MAX_SIZE}]",
    "model.mamba_num_groups": f"[1, {MAX_SIZE}]",
    "model.mamba_expand": f"[1, {MAX_SIZE}]",
    "model.mamba_conv_kernel": f"[1, {MAX_SIZE}]",
    "model.mamba_chunk_size": f"[1, {MAX_SIZE}]",
    "model.init_std": "[0, inf)",
    "data.max_corpus_bytes": "[1, inf)",
    "data.valid_fraction": "[0, 0.5)",
    "train.steps": "[1, inf)",
    "train.micro_batch_size": f"[1, {MAX_SIZE}]",
    "train.global_batch_size": f"[1, {MAX_SIZE}]",
    "train.lr": "(0, inf)",
    "train.min_lr": "[0, inf)",
    "train.warmup_steps": "[0, inf)",
    "train.decay_steps": "[1, inf)",
    "train.wsd_decay_fraction": "(0, 1]",
    "train.wsd_decay_steps": "[1, inf)",
    "train.weight_decay": "[0, inf)",
    "train.adam_beta1": "[0, 1)",
    "train.adam_beta2": "[0, 1)",
    "train.adam_eps": "(0, inf)",
    "train.grad_clip": "[0, inf)",
    "train.seed": f"[0, {2**32 - 1}]",  # numpy's seed range
    "train.max_skipped_steps": "[0, inf)",
    "train.fp8_amax_history": f"[1, {MAX_SIZE}]",
    "train.profile.start": "[0, inf)",
    "train.profile.steps": "[1, inf)",
    "train.eval_interval": "[0, inf)",
    "train.eval_batches": "[1, inf)",
    "parallel.tp": "[1, inf)",
    "parallel.pp": "[1, inf)",
    "parallel.dp": "-1 or [1, inf)",  # -1: world size / (tp x pp)
    "parallel.timeout_minutes": "[1, inf)",
    "checkpoint.interval": "[0, inf)",
    "checkpoint.keep_last": "[0, inf)",
    "logging.interval": "[1, inf)",
    "logging.peak_tflops": "[0, inf)",
    "slurm.nodes": "[1, inf)",
    "slurm.gpus_per_node": "[0, inf)",
    "slurm.tasks_per_node": "[0, inf)",
    "slurm.cpus_per_task": "[1, inf)",
    "slurm.signal_delay_s": "[1, inf)",
    "slurm.max_num_timeout": "[0, inf)",
    "slurm.gpu_memory_gb": "[0, inf)",
}
_INTERVAL = re.compile(r"([\[(])(\S+), (\S+)([\])])")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _in_range(value: float, spec: str) -> bool:
    for part in spec.split(" or "):
        m = _INTERVAL.fullmatch(part)
        if m is None:
            if value == float(part):
                return True
            continue
        low, high = float(m[2]), float(m[3])
        above = low < value if m[1] == "(" else low <= value
        if above and (value < high if m[4] == ")" else value <= high):
            return True
    return False


def _describe_range(spec: str, value: float) -> str:
    """What `value` should be: the side it crossed of a bound and a cap ('>= 1', '<= 10000'),
    else the whole spec ('in [0, 1]', '-1 or >= 1')."""
    m = _INTERVAL.fullmatch(spec)
    if m and float(m[3]) > 1:
        if not _in_range(value, f"{m[1]}{m[2]}, inf)"):
            return f"{'>' if m[1] == '(' else '>='} {m[2]}"
        return f"{'<' if m[4] == ')' else '<='} {m[3]}"
    words = []
    for part in spec.split(" or "):
        m = _INTERVAL.fullmatch(part)
        if m and m[3] == "inf":
            words.append(f"{'>' if m[1] == '(' else '>='} {m[2]}")
        else:
            words.append(part if m is None else f"in {part}")
    return " or ".join(words)


def _is_numeric(tp: Any) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp in (int, float) or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and args in ([int], [float])
    )


def check_ranges(section: Any, prefix: str = "") -> None:
    """RecipeError for the first numeric field of a recipe or section (nested ones included) that
    is not finite or not in RANGES."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key)
        elif value is not None and _is_numeric(hints[f.name]):
            if isinstance(value, int):  # before any float conversion, which could overflow
                check(abs(value) <= INT64_MAX, key, f"{shown(value)} is too large (over 64 bits)")
            check(math.isfinite(value), key, f"must be a finite number, got {value}")
            spec = RANGES[key]
            check(
                _in_range(value, spec), key, f"must be {_describe_range(spec, value)}, got {value}"
            )


def check_name(name: str, key: str = "name") -> None:
    """A run or job name is one safe path component: it names Slurm jobs and files."""
    check(
        NAME.fullmatch(name) is not None,
        key,
        f"{shown(name)} must be one path component: letters, digits, '.', '_' and '-', not "
        "starting with '.' or '-', at most 128 characters",
    )
