"""[parallel], [checkpoint], [logging] and [slurm]: how a run is laid out, what it writes, and
the Slurm job that runs it."""

from dataclasses import dataclass
from typing import Literal

from toolkit.config.base import opt


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
    python: str | None = opt(
        None, "Python on the nodes (default: this one; python3 in a container)"
    )
    signal_delay_s: int = opt(90, "seconds before the limit to signal a checkpoint-and-requeue")
    max_num_timeout: int = opt(3, "how many times a job may requeue after a timeout")
    gpu_memory_gb: float = opt(
        0.0, "memory of one GPU in GB (0: unknown); submission refuses a layout that cannot fit"
    )
