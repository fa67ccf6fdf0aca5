"""The recipe: one TOML file drives model, data, training, parallel layout, checkpoints, logging, Slurm.

`load_recipe(path, overrides)` parses, type-checks and validates; every error names the key and
the reason, e.g. ``recipes/x.toml: model.hidden_size: expected int, got str 'big'``.
"""

import argparse
import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from toolkit.layout import MAX_LAYERS, LayerLayout, build_layout


class RecipeError(ValueError):
    """A recipe is malformed: the message names the file, the key and what to do."""


def opt(default: Any, help: str) -> Any:
    """A recipe field with its help text (listed by `python -m toolkit.config --keys`)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def req(help: str) -> Any:
    return field(metadata={"help": help})


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    num_layers: int = req("number of blocks (each block is one Mamba-2, attention or MLP layer)")
    hidden_size: int = req("model width")
    seq_length: int = req("training sequence length in tokens")
    att_ratio: float = opt(0.0, "share of attention blocks (reference ATT)")
    mlp_ratio: float = opt(0.0, "share of MLP blocks (reference MLP); Mamba share = 1-ATT-MLP")
    pattern: str | None = opt(None, "explicit layer pattern of M * - (and | stage markers)")
    num_attention_heads: int = opt(16, "query heads per attention block")
    num_query_groups: int = opt(8, "key/value heads (GQA groups)")
    ffn_hidden_size: int = opt(0, "MLP inner width (0: 4 x hidden_size)")
    mlp_activation: Literal["gelu", "relu2", "swiglu"] = opt("gelu", "MLP activation")
    norm: Literal["rmsnorm", "layernorm"] = opt("rmsnorm", "block norm type")
    norm_eps: float = opt(1e-5, "norm epsilon")
    position_embedding: Literal["none", "rope"] = opt("none", "hybrids use none")
    rotary_percent: float = opt(1.0, "fraction of each head's channels rotated by RoPE")
    rotary_base: float = opt(10000.0, "RoPE base")
    vocab_size: int | None = opt(None, "vocabulary before padding (default: the tokenizer's)")
    make_vocab_size_divisible_by: int = opt(128, "pad the vocabulary to a multiple of this x TP")
    mamba_state_dim: int = opt(128, "Mamba-2 state size N")
    mamba_head_dim: int = opt(64, "Mamba-2 head dim P")
    mamba_num_groups: int = opt(8, "Mamba-2 groups G for B and C")
    mamba_expand: int = opt(2, "d_inner = expand x hidden_size")
    mamba_conv_kernel: int = opt(4, "depthwise causal conv width")
    mamba_chunk_size: int = opt(128, "SSD chunk length")
    init_std: float = opt(0.02, "init std of linear and embedding weights")
    kernels: Literal["auto", "reference", "mamba_ssm"] = opt(
        "auto", "SSD implementation: mamba_ssm (Triton, CUDA) when available, else reference"
    )

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size


@dataclass(kw_only=True, slots=True)
class DataConfig:
    tokenizer: str = opt(
        "byte",
        "'byte' (256 bytes + specials), a Hugging Face tokenizer .json file or a SentencePiece "
        ".model file (or hf:PATH, sentencepiece:PATH)",
    )
    source: str = opt("stdlib", "'stdlib' (embedded corpus from Python's sources) or a text file")
    max_corpus_bytes: int = opt(4_000_000, "cap on the corpus size read from the source")
    valid_fraction: float = opt(
        0.0, "share of the source (its end) held out for validation; never trained on"
    )
    blend: list[Any] = opt(
        [],
        "indexed datasets (.bin/.idx path prefixes) and weights, [[0.7, 'a'], [0.3, 'b']] "
        "(or ['a']); used instead of source",
    )
    split: str = opt("969,30,1", "train,valid,test shares of each blended dataset's documents")
    cache_dir: str | None = opt(
        None,
        "where sample/shuffle/blend index files go (default: index_cache/ beside each dataset)",
    )

    def weighted_prefixes(self) -> list[tuple[float, str]]:
        """data.blend as (weight, prefix) pairs; a bare prefix weighs 1."""
        return [(1.0, e) if isinstance(e, str) else (float(e[0]), e[1]) for e in self.blend]


@dataclass(kw_only=True, slots=True)
class ProfileConfig:
    start: int = opt(0, "first step traced by torch.profiler (0: no trace)")
    steps: int = opt(3, "how many steps to trace")
    nvtx: bool = opt(False, "NVTX ranges around every block, for Nsight Systems (CUDA only)")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = req("optimizer steps to run")
    micro_batch_size: int = opt(1, "sequences per forward/backward")
    global_batch_size: int = opt(1, "sequences per optimizer step (all ranks, all micro-batches)")
    lr: float = opt(2.5e-4, "peak learning rate")
    min_lr: float = opt(2.5e-5, "final learning rate")
    lr_schedule: Literal["cosine", "wsd", "constant"] = opt("cosine", "decay after warmup")
    warmup_steps: int = opt(0, "linear warmup steps")
    decay_steps: int | None = opt(None, "steps over which lr decays (default: steps)")
    wsd_decay_fraction: float = opt(0.1, "WSD: final fraction of decay_steps spent decaying")
    weight_decay: float = opt(
        0.1, "AdamW decoupled weight decay (not on norms, biases, A_log, D, dt_bias)"
    )
    adam_beta1: float = opt(0.9, "Adam beta1")
    adam_beta2: float = opt(0.95, "Adam beta2")
    adam_eps: float = opt(1e-8, "Adam epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    precision: Literal["fp32", "bf16", "fp8"] = opt(
        "bf16",
        "compute precision (master weights fp32); fp8: the blocks' linears in float8 (Transformer "
        "Engine if importable, else torchao; CUDA with compute capability >= 8.9), the first and "
        "last blocks, embedding and output layer in bf16",
    )
    fp8_engine: Literal["auto", "transformer_engine", "torchao"] = opt(
        "auto",
        "float8 library with precision='fp8': auto takes the one installed; with both, torchao "
        "when train.compile is on (it was faster here), Transformer Engine when it is off",
    )
    fp8_recipe: Literal["tensorwise", "rowwise", "delayed"] = opt(
        "tensorwise",
        "float8 scaling with precision='fp8': tensorwise (one scale per tensor from its current "
        "amax: torchao tensorwise, Transformer Engine Float8CurrentScaling), rowwise (torchao "
        "only), delayed (scales from an amax history: Transformer Engine DelayedScaling only)",
    )
    activation_checkpointing: Any = opt(
        "none",
        "recompute block activations in backward: 'none', 'full' (every block), or a list of "
        "block kinds out of 'mamba', 'attention', 'mlp'",
    )
    compile: Any = opt(
        False,
        "torch.compile each block separately: true, false, or a list of block kinds out of "
        "'mamba', 'attention', 'mlp'",
    )
    seed: int = opt(1234, "seed for init and data order")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: cuda when available")
    nan_policy: Literal["stop", "skip"] = opt("stop", "on a NaN/inf loss: stop, or skip the step")
    max_skipped_steps: int = opt(10, "with nan_policy=skip, stop after this many skips in a row")
    sample_prompt: str = opt(
        "", "if set, print a sampled continuation of it after training (temperature 0.7, top-k 20)"
    )
    profile: ProfileConfig = opt(None, "profiling: train.profile = {start = 10, steps = 3}")
    eval_interval: int = opt(0, "validation loss every N steps and at the end (0: never)")
    eval_batches: int = opt(4, "micro-batches per validation (the same ones every time)")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    tp: int = opt(1, "tensor-parallel degree")
    pp: int = opt(1, "pipeline-parallel degree")
    dp: int = opt(-1, "data-parallel degree (-1: world size / (tp x pp))")
    sequence_parallel: bool = opt(
        False, "split the residual stream and norms along the sequence over TP ranks (TP > 1)"
    )
    shard_optimizer: bool = opt(
        True, "with DP > 1, each rank keeps only its share of the Adam state"
    )


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    enabled: bool = opt(True, "write checkpoints (false for benchmarks and throwaway runs)")
    dir: str = opt("runs/default/checkpoints", "where checkpoints go")
    interval: int = opt(0, "save every N steps (0: only at the end)")
    keep_last: int = opt(2, "how many published checkpoints to keep (0: all)")
    resume: bool = opt(True, "resume from the latest checkpoint in dir if there is one")
    on_corrupt: Literal["fallback", "fail"] = opt(
        "fallback",
        "resuming from a damaged checkpoint (a chunk's checksum or size is wrong): fall back to "
        "the newest intact one, with a warning naming what was skipped; or fail (exit 1)",
    )
    async_save: bool = opt(
        False, "write checkpoints in a background thread (costs one CPU copy of each rank's share)"
    )


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    dir: str = opt("runs/default/tensorboard", "TensorBoard event directory")
    interval: int = opt(10, "log every N steps")
    progress_bar: bool = opt(True, "show a progress bar on rank 0")
    peak_tflops: float = opt(
        0.0, "per-GPU dense peak TFLOP/s for MFU (0: from the GPU's name; none on CPUs)"
    )


@dataclass(kw_only=True, slots=True)
class SlurmConfig:
    partition: str | None = opt(None, "partition (-p)")
    account: str | None = opt(None, "account (-A)")
    qos: str | None = opt(None, "quality of service")
    nodes: int = opt(1, "nodes")
    gpus_per_node: int = opt(8, "GPUs per node (one task per GPU); 0 for CPU-only nodes")
    tasks_per_node: int = opt(0, "ranks per node (0: one per GPU, or 1 without GPUs)")
    cpus_per_task: int = opt(8, "CPU cores per task")
    time: str = opt("04:00:00", "time limit HH:MM:SS or D-HH:MM:SS")
    exclusive: bool = opt(True, "whole nodes")
    constraint: str | None = opt(None, "node features (-C)")
    mail_user: str | None = opt(None, "mail address")
    mail_type: str | None = opt(None, "mail events, e.g. END,FAIL")
    extra_sbatch: list[str] = opt([], "extra '#SBATCH' lines, without the prefix")
    container_image: str | None = opt(None, "pyxis image (.sqsh or docker ref) or Apptainer .sif")
    container_mounts: list[str] = opt([], "host:container mounts")
    container_engine: Literal["auto", "pyxis", "apptainer", "podman"] = opt(
        "auto", "how srun runs container_image (auto: apptainer for a .sif, else pyxis)"
    )
    python: str | None = opt(
        None, "Python on the nodes (default: this one; python3 in a container)"
    )
    signal_delay_s: int = opt(90, "seconds before the limit to signal a checkpoint-and-requeue")
    max_num_timeout: int = opt(3, "how many times a job may requeue after a timeout")
    gpu_memory_gb: float = opt(
        0.0, "memory of one GPU in GB (0: unknown); submission refuses a layout that cannot fit"
    )


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


# ---------------------------------------------------------------------------------------------
# Parsing: TOML table -> dataclasses, with errors naming the key.


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _shown(value: Any) -> str:
    """repr(value) cut to a readable length for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a table [{key}], got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: 1 followed by 400 zeros
            raise RecipeError(f"{key}: {_shown(value)} is too large for a float") from None
    if tp in (int, str, bool, float) and (type(value) is not tp):
        raise RecipeError(
            f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {_shown(value)}"
        )
    return value


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{full}: unknown key{hint}; valid keys: {', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], full)
    for name, f in fields.items():
        missing_default = (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if name not in kwargs and missing_default:
            full = f"{prefix}.{name}" if prefix else name
            raise RecipeError(f"{full}: required key is missing ({f.metadata.get('help', '')})")
        if name not in kwargs and f.default is None and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def apply_override(table: dict[str, Any], assignment: str) -> None:
    """Apply `section.key=value` (the value in TOML syntax, or a bare string) to a raw table."""
    path, sep, text = assignment.partition("=")
    if not sep or not path.strip():
        raise RecipeError(f"--set {assignment!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except ValueError:  # not TOML (TOMLDecodeError), or an integer of over 4300 digits
        value = text
    *sections, leaf = path.strip().split(".")
    node = table
    for s in sections:
        node = node.setdefault(s, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {assignment!r}: {s} is not a section")
    node[leaf] = value


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe argument and --set overrides, shared by every entry point that trains."""
    parser.add_argument("recipe", help="recipe TOML file, e.g. recipes/tiny_hybrid.toml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)",
    )


def recipe_from_dict(
    table: dict[str, Any], overrides: list[str] = (), world_size: int | None = None
) -> Recipe:
    table = {k: dict(v) if isinstance(v, dict) else v for k, v in table.items()}
    for assignment in overrides:
        apply_override(table, assignment)
    recipe = _build(Recipe, table, "")
    validate(recipe, world_size)
    return recipe


def load_recipe(
    path: str | Path, overrides: list[str] = (), world_size: int | None = None
) -> Recipe:
    """Read, type-check and validate a recipe (with world_size: for that many ranks);
    RecipeError messages start with the file name."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_bytes().decode("utf-8"))  # UTF-8 whatever the locale
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory; give a recipe .toml file") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); TOML is UTF-8") from None
    except ValueError as e:  # TOMLDecodeError, or an integer of over 4300 digits
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    try:
        return recipe_from_dict(table, overrides, world_size)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Validation of values that types cannot express: ranges, names, divisibility, the layout.

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
    "train.weight_decay": "[0, inf)",
    "train.adam_beta1": "[0, 1)",
    "train.adam_beta2": "[0, 1)",
    "train.adam_eps": "(0, inf)",
    "train.grad_clip": "[0, inf)",
    "train.seed": f"[0, {2**32 - 1}]",  # numpy's seed range
    "train.max_skipped_steps": "[0, inf)",
    "train.profile.start": "[0, inf)",
    "train.profile.steps": "[1, inf)",
    "train.eval_interval": "[0, inf)",
    "train.eval_batches": "[1, inf)",
    "parallel.tp": "[1, inf)",
    "parallel.pp": "[1, inf)",
    "parallel.dp": "-1 or [1, inf)",  # -1: world size / (tp x pp)
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


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise RecipeError(f"{key}: {why}")


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
                _check(abs(value) <= INT64_MAX, key, f"{_shown(value)} is too large (over 64 bits)")
            _check(math.isfinite(value), key, f"must be a finite number, got {value}")
            spec = RANGES[key]
            _check(
                _in_range(value, spec), key, f"must be {_describe_range(spec, value)}, got {value}"
            )


def check_name(name: str, key: str = "name") -> None:
    """A run or job name is one safe path component: it names Slurm jobs and files."""
    _check(
        NAME.fullmatch(name) is not None,
        key,
        f"{_shown(name)} must be one path component: letters, digits, '.', '_' and '-', not "
        "starting with '.' or '-', at most 128 characters",
    )


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


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Round the vocabulary up to a multiple of divisible_by x TP (Megatron's rule)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


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
            kind = _type_name(hints[f.name]).replace("typing.", "")
            lines.append(f"  {f.name} ({kind}, {default}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import json
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m toolkit.config",
        description="Validate a recipe and print it resolved, or list every recipe key.",
    )
    parser.add_argument("recipe", nargs="?", help="recipe TOML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--world-size", type=int, help="also check the layout fits this many ranks")
    parser.add_argument("--keys", action="store_true", help="list all recipe keys and exit")
    args = parser.parse_args(argv)
    if args.keys:
        print(describe_keys())
        return 0
    if not args.recipe:
        parser.error("give a recipe file, or --keys")
    if args.world_size is not None and args.world_size < 1:
        parser.error("--world-size must be >= 1")
    try:
        recipe = load_recipe(args.recipe, args.set, args.world_size)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(recipe.to_dict(), indent=2))
    from toolkit.memory import describe_plan, gpu_memory_gb, plan_memory  # local: builds models

    world = args.world_size or default_world_size(recipe)
    print(f"memory plan at {world} ranks (bf16 activations, GPU kernels; toolkit/memory.py):")
    print(describe_plan(plan_memory(recipe, world), gpu_memory_gb(recipe.slurm.gpu_memory_gb)))
    return 0


def default_world_size(recipe: Recipe) -> int:
    """The ranks a recipe's job gets: its Slurm GPUs, or TP x PP x DP when DP is fixed."""
    p = recipe.parallel
    if p.dp != -1:
        return p.tp * p.pp * p.dp
    s = recipe.slurm
    return max(s.nodes * (s.tasks_per_node or s.gpus_per_node or 1), p.tp * p.pp)


if __name__ == "__main__":
    # Through the imported module: run as __main__, this file's RecipeError would be a second
    # class, and toolkit.slurm raises the imported one.
    from toolkit.config import main as module_main

    raise SystemExit(module_main())
