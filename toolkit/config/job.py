"""[parallel], [checkpoint], [logging] and [slurm]: how a run is laid out, what it writes, and
the Slurm job that runs it."""

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

from toolkit.config.base import RecipeError, check, opt
from toolkit.config.ranges import check_ranges


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
    timeout_minutes: int = opt(
        10,
        "how long a collective waits for the other ranks before the run fails (every process "
        "group; Megatron's --distributed-timeout-minutes)",
    )

    def validate(self) -> None:
        """The degrees' ranges; what they must divide is config.layout_check's."""
        check_ranges(self, "parallel")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    enabled: bool = opt(
        True,
        "write checkpoints (false for benchmarks and throwaway runs; checkpoint.resume still "
        "reads checkpoint.dir: with both false the run starts fresh whatever the dir holds)",
    )
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
    init_from: str | None = opt(
        None,
        "start a new run from this checkpoint's model weights (a run's checkpoint dir, its "
        "latest, or one step_N; any TP/PP layout): step 0, a new optimizer, the data from its "
        "start (fine-tuning; Megatron's --pretrained-checkpoint). Once checkpoint.dir holds a "
        "checkpoint the run resumes from that instead",
    )

    def validate(self) -> None:
        check_ranges(self, "checkpoint")
        _check_directory(self.dir, "checkpoint.dir")
        if self.init_from is not None:
            _check_directory(self.init_from, "checkpoint.init_from")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    dir: str = opt("runs/default/tensorboard", "TensorBoard event directory")
    interval: int = opt(10, "log every N steps")
    progress_bar: bool = opt(True, "show a progress bar on rank 0")
    peak_tflops: float = opt(
        0.0, "per-GPU dense peak TFLOP/s for MFU (0: from the GPU's name; none on CPUs)"
    )

    def validate(self) -> None:
        check_ranges(self, "logging")
        _check_directory(self.dir, "logging.dir")


def _check_directory(value: str, key: str) -> None:
    check(value.strip() != "", key, "must be a directory path, got an empty string")


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
    env: list[str] = opt(
        [],
        "environment of every rank, 'NAME=value' each (the value taken literally, no shell "
        "expansion), e.g. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; --local runs too",
    )
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

    @property
    def world_size(self) -> int:
        """The job's ranks: nodes x tasks per node."""
        return self.nodes * tasks_per_node(self)

    def validate(self) -> None:
        """A job no cluster could run: control characters in #SBATCH lines, more ranks than GPUs
        per node, a time limit Slurm cannot read or that the pre-timeout signal fills. The
        cluster's own sizes (nodes, CPUs, GPUs per node) are Slurm's to check at submission."""
        check_ranges(self, "slurm")
        for f in dataclasses.fields(self):  # a line break would end an #SBATCH line
            values = getattr(self, f.name)
            for i, v in enumerate(values if isinstance(values, list) else [values]):
                if isinstance(v, str) and any(c < " " or c == "\x7f" for c in v):
                    key = f"slurm.{f.name}" + (f"[{i}]" if isinstance(values, list) else "")
                    raise RecipeError(f"{key}: {v!r} holds a control character; give one line")
        seen: set[str] = set()
        for i, entry in enumerate(self.env):
            name, sep, _ = entry.partition("=")
            key = f"slurm.env[{i}]"
            check(
                bool(sep) and ENV_NAME.match(name) is not None,
                key,
                f"{entry!r}: expected NAME=value, NAME of letters, digits and underscores",
            )
            check(
                name not in LAUNCHER_ENV and not name.startswith(LAUNCHER_ENV_PREFIXES),
                key,
                f"{name} is set for each rank by Slurm or the launcher",
            )
            check(name not in seen, key, f"{name} is given twice")
            seen.add(name)
        check(
            self.container_engine == "auto" or bool(self.container_image),
            "slurm.container_engine",
            f"{self.container_engine!r} needs slurm.container_image (the image to run): set it, "
            "or leave the engine at 'auto'",
        )
        check(
            not self.gpus_per_node or tasks_per_node(self) <= self.gpus_per_node,
            "slurm.tasks_per_node",
            f"{tasks_per_node(self)} ranks per node but {self.gpus_per_node} GPUs per node: each "
            "rank needs its own GPU",
        )
        try:
            limit = slurm_seconds(self.time)
        except ValueError as e:
            raise RecipeError(f"slurm.time: {e}") from None
        check(
            not limit or self.signal_delay_s < limit,  # 0 is no limit, as in Slurm
            "slurm.signal_delay_s",
            f"{self.signal_delay_s} s before a limit of {self.time} leaves no time to train: "
            "lower it or raise slurm.time",
        )


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# What Slurm and the launchers set for each rank (its place in the job): not a recipe's to set.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
LAUNCHER_ENV_PREFIXES = ("SLURM_", "SUBMITIT_")


def job_environment(s: SlurmConfig) -> dict[str, str]:
    """slurm.env as {NAME: value}, in the recipe's order."""
    return dict(entry.split("=", 1) for entry in s.env)


def tasks_per_node(s: SlurmConfig) -> int:
    """Ranks per node: as configured, else one per GPU, else one."""
    return s.tasks_per_node or s.gpus_per_node or 1


def slurm_seconds(value: str) -> int | None:
    """Seconds in a Slurm duration (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None for no
    limit. ValueError for anything else."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, clock = value.rpartition("-")
    parts = clock.split(":")
    if not (days == "" or days.isdigit()) or len(parts) > 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"{value!r} is not a Slurm time (HH:MM:SS, D-HH:MM:SS or minutes)")
    n = [int(p) for p in parts]
    if days:  # D-HH[:MM[:SS]]
        h, m, sec = (n + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + sec
    if len(n) == 3:
        return n[0] * 3600 + n[1] * 60 + n[2]
    return n[0] * 60 + (n[1] if len(n) == 2 else 0)  # MM or MM:SS
