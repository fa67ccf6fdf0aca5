"""What the training loop needs from the parallel layout, in one place: the loss, gradient
reduction over DP, clipping by the global norm, and the step runner (micro-batches or pipeline).
"""

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial

import torch
import torch.distributed as dist

from toolkit.distributed import ParallelEnv
from toolkit.loss import blockwise_cross_entropy
from toolkit.model import HybridLM
from toolkit.parallel.pp import build_pipeline
from toolkit.parallel.tp import apply_tp, vocab_parallel_cross_entropy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy over the real vocabulary: padding columns take no probability, so the
    padded rows never matter (and checkpoints need not store them). Computed block by block, so
    no fp32 copy of the whole logits tensor exists (toolkit/loss.py)."""
    return blockwise_cross_entropy(logits, labels, vocab_size)


def parallelize(model: HybridLM, env: ParallelEnv) -> LossFn:
    """Apply tensor parallelism to a freshly built (identical on every rank) model; returns the
    loss for its logits. Pipeline stages are cut afterwards, by StepRunner."""
    if env.tp == 1:
        return partial(cross_entropy, vocab_size=model.vocab_size)
    group = env.group("tp")
    vocab_start = apply_tp(model, group=group, tp=env.tp, rank=env.tp_rank)
    return partial(
        vocab_parallel_cross_entropy,
        vocab_start=vocab_start,
        vocab_size=model.vocab_size,
        group=group,
    )


def average_over_dp(tensors: list[torch.Tensor], env: ParallelEnv) -> None:
    """Mean over data-parallel ranks, in place, in fp32 (the gradients are fp32 here)."""
    if env.dp == 1:
        return
    group = env.group("dp")
    for t in tensors:
        dist.all_reduce(t, group=group)
        t.div_(env.dp)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, env: ParallelEnv) -> float:
    """Global gradient norm over the whole model (TP shards counted once each, replicated
    parameters once), then scale gradients so it is at most max_norm (as torch's clip does)."""
    with_grad = [p for p in params if p.grad is not None]

    def sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
        # One multi-tensor kernel for all the norms instead of ~4 small kernels per parameter
        # (launch-bound on a GPU); the per-tensor norms are summed in fp64.
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=env.device)
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        return torch.stack(norms).double().square().sum()

    sharded = sum_of_squares([p.grad.detach() for p in with_grad if hasattr(p, "_tp_dim")])
    replicated = sum_of_squares([p.grad.detach() for p in with_grad if not hasattr(p, "_tp_dim")])
    if env.tp > 1:
        dist.all_reduce(sharded, group=env.group("tp"))
    squares = sharded + replicated
    if env.pp > 1:  # each stage holds different parameters
        dist.all_reduce(squares, group=env.group("pp"))
    total = math.sqrt(float(squares))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0 and with_grad:
        torch._foreach_mul_([p.grad for p in with_grad], coef)
    return total


class StepRunner:
    """Forward and backward of one optimizer step's batch on this rank: a loop over micro-batches
    with gradient accumulation, or a pipeline schedule when PP > 1. Returns the mean micro-batch
    loss, the same on every rank of the model replica."""

    def __init__(
        self,
        model: HybridLM,
        env: ParallelEnv,
        loss_fn: LossFn,
        *,
        micro_batch_size: int,
        micro_batches: int,
        seq_length: int,
        autocast: Callable[[], AbstractContextManager],
        logits_dtype: torch.dtype,
    ) -> None:
        self.env, self.loss_fn, self.autocast = env, loss_fn, autocast
        self.micro_batch_size, self.micro_batches = micro_batch_size, micro_batches
        self.module: torch.nn.Module = model
        self.schedule = None
        if env.pp > 1:
            self.module, self.schedule = build_pipeline(
                model,
                env,
                loss_fn=loss_fn,
                micro_batch_size=micro_batch_size,
                micro_batches=micro_batches,
                seq_length=seq_length,
                logits_dtype=logits_dtype,
            )

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.schedule is None:
            total = torch.zeros((), device=inputs.device)
            for x, y in zip(
                inputs.split(self.micro_batch_size), labels.split(self.micro_batch_size)
            ):
                with self.autocast():
                    logits = self.module(x)
                loss = self.loss_fn(logits, y) / self.micro_batches
                loss.backward()
                total += loss.detach()
            return total
        losses: list[torch.Tensor] = []
        with self.autocast():
            if self.module.first:
                self.schedule.step(inputs, return_outputs=False)
            elif self.module.last:
                self.schedule.step(target=labels, losses=losses, return_outputs=False)
            else:
                self.schedule.step(return_outputs=False)
        # Only the last stage has the loss: share it along the pipeline.
        total = torch.zeros((), device=inputs.device)
        if losses:
            total += torch.stack([loss.detach().float() for loss in losses]).mean()
        dist.all_reduce(total, group=self.env.group("pp"))
        return total
