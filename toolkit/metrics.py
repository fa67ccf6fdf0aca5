"""What a training run reports, from rank 0: TensorBoard scalars (loss, learning rate, gradient
norm, throughput, TFLOP/s and MFU, peak memory, validation loss and perplexity), and a live
progress bar on a terminal or, in batch logs (Slurm, CI), one log line per logging.interval."""

import logging
import math
import resource
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from toolkit.config import Recipe
from toolkit.model import HybridLM
from toolkit.profiling import peak_tflops

# The trainer's logger: these are the trainer's lines, and only rank 0 logs them at INFO.
log = logging.getLogger("toolkit.train")


@dataclass
class StepStats:
    """What one optimizer step measured."""

    loss: float
    lr: float
    grad_norm: float
    seconds: float


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # past ~709 nats exp overflows a float


class Metrics:
    """The run's TensorBoard writer (rank 0 only) and progress bar, from `start_step` on.
    `params` and `step_flops` are the whole model's (before it is sharded): FLOPs per step over
    all ranks, divided by the world size for the per-rank TFLOP/s."""

    def __init__(
        self,
        recipe: Recipe,
        model: HybridLM,
        device: torch.device,
        *,
        rank: int,
        world_size: int,
        start_step: int,
        params: int,
        step_flops: float,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when training

        self.recipe, self.device, self.world_size = recipe, device, world_size
        self.start_step, self.params, self.step_flops = start_step, params, step_flops
        self.tokens_per_step = recipe.train.global_batch_size * recipe.model.seq_length
        self.writer = SummaryWriter(recipe.logging.dir) if rank == 0 else None
        if self.writer is not None and start_step == 0:
            self.writer.add_text("recipe", f"```\n{recipe.to_dict()}\n```")
            self.writer.add_text("pattern", model.layout.summary())
        # A live bar on a terminal; in batch logs (Slurm, CI) one line per logging interval.
        self.show_bar = rank == 0 and recipe.logging.progress_bar and sys.stderr.isatty()
        self.bar = tqdm(
            total=recipe.train.steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not self.show_bar,
            mininterval=1.0,
            file=sys.stderr,
        )
        self.peak = peak_tflops(device, recipe.train.precision, recipe.logging.peak_tflops)

    def train_step(self, step: int, stats: StepStats, consumed: int) -> None:
        """The bar after every step; the scalars (and the log line) when one is due: the first
        step of this run, every logging.interval, and the last."""
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}")
        steps = self.recipe.train.steps
        due = step == self.start_step + 1 or step % self.recipe.logging.interval == 0
        if self.writer is None or not (due or step == steps):
            return
        scalars = self.scalars(stats, consumed)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        if not self.show_bar:
            mfu = f"MFU {scalars['perf/mfu']:.1%} " if "perf/mfu" in scalars else ""
            log.info(
                "step %d/%d loss %.4f lr %.3e grad_norm %.3f %.0f tokens/s %.2f TFLOP/s per rank "
                "%speak memory %.2f GB",
                step,
                steps,
                stats.loss,
                stats.lr,
                stats.grad_norm,
                scalars["perf/tokens_per_s"],
                scalars["perf/tflops_per_rank"],
                mfu,
                scalars["perf/peak_memory_gb"],
            )

    def scalars(self, stats: StepStats, consumed: int) -> dict[str, float]:
        tflops = self.step_flops / stats.seconds / 1e12 / self.world_size
        scalars = {
            "train/loss": stats.loss,
            "train/lr": stats.lr,
            "train/grad_norm": stats.grad_norm,
            "perf/step_time_s": stats.seconds,
            "perf/tokens_per_s": self.tokens_per_step / stats.seconds,
            # Per rank: one GPU each on GPUs, while CPU ranks may share one processor.
            "perf/tflops_per_rank": tflops,
            "perf/peak_memory_gb": peak_memory_gb(self.device),
            "model/parameters": self.params,
            "train/consumed_samples": consumed,
        }
        if self.peak is not None:  # model FLOPs utilisation against the GPU's dense peak
            scalars["perf/mfu"] = tflops / self.peak
        return scalars

    def validation(self, step: int, loss: float) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("valid/loss", loss, step)
        self.writer.add_scalar("valid/perplexity", perplexity(loss), step)
        self.writer.flush()
        log.info("step %d validation loss %.4f (perplexity %.2f)", step, loss, perplexity(loss))

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
