"""How a run stops before its last step.

- A stop signal (SIGTERM, or Slurm's pre-timeout SIGUSR2) is noted by `StopRequest`; at the next
  step boundary every rank learns of it (`stop_requested`), checkpoints and stops. After USR2,
  rank 0 then puts the Slurm job back in the queue (`requeue_after_usr2`), to resume from that
  checkpoint.
- A non-finite loss stops the run or skips its step, as train.nan_policy says (`NanPolicy`).
- `TrainingError`: the run cannot go on (exit status 1).
"""

import logging
import math
import signal

import torch

from toolkit.config import SlurmConfig, TrainConfig
from toolkit.distributed import ParallelEnv
from toolkit.slurm import requeue_after_signal

# The trainer's logger: these are the trainer's lines, and only rank 0 logs them at INFO.
log = logging.getLogger("toolkit.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. non-finite loss under nan_policy='stop')."""


class StopRequest:
    """Set by SIGTERM/SIGUSR2; the loop checkpoints and returns at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum


def stop_requested(stop: StopRequest, env: ParallelEnv) -> bool:
    """Whether any rank got a stop signal: all ranks must checkpoint and stop at the same step."""
    flag = torch.tensor(float(stop.signum is not None), device=env.device)
    if env.world_size > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def requeue_after_usr2(stop: StopRequest, s: SlurmConfig) -> None:
    """After Slurm's pre-timeout signal (USR2) and its checkpoint, on rank 0: put this job back in
    the queue; it resumes from the checkpoint just written. After more than slurm.max_num_timeout
    timeouts, the run ends here (TrainingError). (A preemption or `scontrol requeue` requeues the
    job by itself.)"""
    if stop.signum != signal.SIGUSR2:
        return
    refused = requeue_after_signal(s)
    if refused is not None:
        raise TrainingError(refused)


class NanPolicy:
    """train.nan_policy for a step whose loss is not finite: 'stop' raises TrainingError (the
    state is not saved: it resumes from the last checkpoint); 'skip' drops the step and goes on,
    unless more than train.max_skipped_steps come in a row."""

    def __init__(self, cfg: TrainConfig, checkpoint_dir: str) -> None:
        self.cfg, self.checkpoint_dir = cfg, checkpoint_dir
        self.skipped = 0  # in the whole run
        self.in_a_row = 0

    def accept(self, step: int, loss: float) -> bool:
        """Whether the step's update may be applied: True for a finite loss, False for one that
        is skipped; TrainingError when the run must stop."""
        if math.isfinite(loss):
            self.in_a_row = 0
            return True
        if self.cfg.nan_policy == "stop":
            raise TrainingError(
                f"step {step}: loss is {loss}; stopping without saving this state. Resume from "
                f"the last checkpoint in {self.checkpoint_dir} with a lower train.lr, or set "
                "train.nan_policy='skip'"
            )
        self.skipped += 1
        self.in_a_row += 1
        log.warning("step %d: loss is %s, step skipped (%d in a row)", step, loss, self.in_a_row)
        if self.in_a_row > self.cfg.max_skipped_steps:
            raise TrainingError(f"{self.in_a_row} non-finite losses in a row; stopping")
        return False
