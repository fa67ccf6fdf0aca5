"""What the training loop needs from the parallel layout, in one place: the loss, gradient
reduction over DP, clipping by the global norm, and the step runner (micro-batches or pipeline).
The transforms that make the model parallel are applied in parallelize.py.
"""

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from toolkit.distributed import ParallelEnv
from toolkit.loss import blockwise_cross_entropy, counted_labels
from toolkit.model import HybridLM
from toolkit.parallel.pp import build_pipeline
from toolkit.parallel.tp import reduce_sequence_parallel_grads
from toolkit.row_sparse_grad import held_grad

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy over the real vocabulary: padding columns take no probability, so the
    padded rows never matter (and checkpoints need not store them). Computed block by block, so
    no fp32 copy of the whole logits tensor exists (toolkit/loss.py)."""
    return blockwise_cross_entropy(logits, labels, vocab_size)


def average_over_dp(tensors: list[torch.Tensor], env: ParallelEnv) -> None:
    """Mean over data-parallel ranks, in place, in fp32 (the gradients are fp32 here)."""
    if env.dp == 1:
        return
    group = env.group("dp")
    for t in tensors:
        dist.all_reduce(t, group=group)
        t.div_(env.dp)


# Gradients of at least this many elements get a norm reduction each: 3.17 against 2.64 TB/s for
# the multi-tensor norm's at 1G elements a tensor (H100, benchmarks/hbm_bandwidth.py, 2026-12-06);
# the threshold is not measured, only taken where one launch's cost is small beside the reads.
NORM_ALONE = 1 << 24


def global_grad_squares(params: list[torch.Tensor], env: ParallelEnv) -> torch.Tensor:
    """The squared global gradient norm over the whole model (TP shards counted once each,
    replicated parameters once), a 0-dim fp64 tensor on env.device; no host sync. A row-sparse
    gradient (toolkit.row_sparse_grad) by its sums: the rows it leaves out are zeros."""
    with_grad = [(p, g) for p in params if (g := held_grad(p)) is not None]

    def sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
        # One multi-tensor kernel for the small tensors' norms instead of ~4 small kernels per
        # parameter (launch-bound on a GPU), a reduction of its own for each large one (faster
        # there: NORM_ALONE); the per-tensor norms are summed in fp64.
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=env.device)
        small = [g for g in grads if g.numel() < NORM_ALONE]
        norms = list(torch._foreach_norm(small, 2, dtype=torch.float32)) if small else []
        norms += [torch.linalg.vector_norm(g, dtype=torch.float32)
                  for g in grads if g.numel() >= NORM_ALONE]  # fmt: skip
        return torch.stack(norms).double().square().sum()

    sharded = sum_of_squares([g.detach() for p, g in with_grad if hasattr(p, "_tp_dim")])
    replicated = sum_of_squares([g.detach() for p, g in with_grad if not hasattr(p, "_tp_dim")])
    if env.tp > 1:
        dist.all_reduce(sharded, group=env.group("tp"))
    squares = sharded + replicated
    if env.pp > 1:  # each stage holds different parameters
        dist.all_reduce(squares, group=env.group("pp"))
    return squares


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, env: ParallelEnv) -> float:
    """Global gradient norm over the whole model (global_grad_squares), then scale gradients in
    place so it is at most max_norm (as torch's clip does)."""
    total = math.sqrt(float(global_grad_squares(params, env)))
    coef = max_norm / (total + 1e-6)
    with_grad = [g for p in params if (g := held_grad(p)) is not None]
    if coef < 1.0 and with_grad:
        torch._foreach_mul_(with_grad, coef)
    return total


def clip_and_step(
    optimizer: Any,
    params: list[torch.Tensor],
    max_norm: float,
    env: ParallelEnv,
    fold: bool = True,
) -> float:
    """The trainer's clipping and update: the global gradient norm (returned, before clipping),
    gradients scaled so it is at most max_norm, optimizer.step(). An optimizer that folds the
    scale into its update (`folds_grad_scale`: train.flat_optimizer) gets the coefficient as a
    0-dim device tensor, so the gradients are read by the norm and the update only, and the
    update is queued without waiting for the norm; any other gets them scaled in place first
    (clip_grad_norm). Both scale by the same fp32 coefficient: the same numbers. `fold=False`
    scales in place whatever the optimizer (to compare the two)."""
    if not (fold and getattr(optimizer, "folds_grad_scale", False)):
        total = clip_grad_norm(params, max_norm, env)
        optimizer.step()
        return total
    if env.device.type != "cuda":
        return float(clip_and_queue_step(optimizer, params, max_norm, env))
    # The norm comes back through pinned memory while the update runs (a .item() after the
    # step would wait for the update; one before it would leave the GPU idle while the host
    # queues the update).
    host = torch.empty((), dtype=torch.float64, pin_memory=True)
    fetched = torch.cuda.Event()
    clip_and_queue_step(optimizer, params, max_norm, env, fetch=(host, fetched))
    fetched.synchronize()
    return float(host)


def clip_and_queue_step(
    optimizer: Any,
    params: list[torch.Tensor],
    max_norm: float,
    env: ParallelEnv,
    fetch: tuple[torch.Tensor, torch.cuda.Event] | None = None,
    skip_unless_finite: torch.Tensor | None = None,
) -> torch.Tensor:
    """clip_and_step's folded path without any host sync (so it can be captured in a CUDA
    graph: toolkit.step_graph): the norm's coefficient handed to an optimizer that
    `folds_grad_scale`. Returns the global gradient norm, a 0-dim fp64 tensor on the device;
    with `fetch` (pinned host tensor, event) it is also copied there before the update. With
    `skip_unless_finite` (the step's loss) a non-finite one makes the coefficient NaN, which
    TritonAdamW takes as: no update (train.nan_policy='skip' where the host cannot look first)."""
    norm = global_grad_squares(params, env).sqrt()
    # clip_grad_norm's coefficient in the same fp64 ops (a true division: `max_norm / tensor`
    # would take a reciprocal), and 1 wherever it does not scale (coef >= 1, or NaN).
    coef = torch.full_like(norm, max_norm) / (norm + 1e-6)
    coef = torch.where(coef < 1.0, coef, 1.0)
    if skip_unless_finite is not None:
        coef = torch.where(skip_unless_finite.isfinite(), coef, torch.nan)
    if fetch is not None:
        fetch[0].copy_(norm, non_blocking=True)
        fetch[1].record()
    optimizer.step(grad_scale=coef)
    return norm


class StepRunner:
    """Forward and backward of one optimizer step's batch on this rank: a loop over micro-batches
    with gradient accumulation, or a pipeline schedule when PP > 1. Returns the mean micro-batch
    loss, the same on every rank of the model replica, with this rank's gradients complete
    (sequence-parallel ones summed over TP); averaging over DP is left to the caller.
    `sequence_shards` is TP under sequence parallelism (the pipeline's activations hold that
    share of the sequence), else 1. `step_context(module)`, if given, is entered around each
    call's micro-batches (train.fp8_weight_cache: the float8 weights cast once for them).

    The loss is the mean of the micro-batches' means (Megatron's default), or with
    `per_token_loss` (train.per_token_loss) one mean over every counted token of the global
    batch: each micro-batch's mean weighted by its share of those tokens, counted over DP
    before the step. The two differ only where labels are left out (data.eod_mask_loss)."""

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
        sequence_shards: int = 1,
        step_context: Callable[[torch.nn.Module], AbstractContextManager] | None = None,
        per_token_loss: bool = False,
    ) -> None:
        self.env, self.loss_fn, self.autocast = env, loss_fn, autocast
        self.per_token_loss = per_token_loss
        self._counted_in_step = torch.ones(())  # per_token_loss: the global batch's count
        self.step_context = step_context or nullcontext
        self.micro_batch_size, self.micro_batches = micro_batch_size, micro_batches
        self.module: torch.nn.Module = model
        self.schedule = None
        self.sequence_shards = sequence_shards
        if env.pp > 1:
            self.module, self.schedule = build_pipeline(
                model,
                env,
                loss_fn=self._pipeline_loss if per_token_loss else loss_fn,
                micro_batch_size=micro_batch_size,
                micro_batches=micro_batches,
                seq_length=seq_length,
                sequence_shards=sequence_shards,
                logits_dtype=logits_dtype,
            )
        self.sequence_parallel = [
            p for p in self.module.parameters() if getattr(p, "_sequence_parallel", False)
        ]

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.per_token_loss:
            self._counted_in_step = self._count_over_dp(labels)
        with self.step_context(self.module):
            loss = self._forward_backward(inputs, labels)
        if self.sequence_parallel:
            reduce_sequence_parallel_grads(self.sequence_parallel, self.env.group("tp"))
        return loss

    def _count_over_dp(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels that count (not IGNORE_INDEX) in the global batch: this rank's summed
        over DP (TP and PP ranks of a replica hold the same labels). At least 1: a batch with
        none gives a loss of 0. Stays on the device: no host sync."""
        counted = counted_labels(labels).sum()
        if self.env.dp > 1:
            dist.all_reduce(counted, group=self.env.group("dp"))
        return counted.clamp(min=1)

    def _share_of_step(self, labels: torch.Tensor) -> torch.Tensor:
        """per_token_loss: a micro-batch's weight, its counted labels over the global batch's,
        times DP (the caller's mean over DP divides that back out)."""
        return counted_labels(labels).sum() * self.env.dp / self._counted_in_step

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """per_token_loss under PP: the schedule divides the gradients by the micro-batch count
        (scale_grads) and its losses are averaged below; the weight undoes both."""
        return self.loss_fn(logits, labels) * (self._share_of_step(labels) * self.micro_batches)

    def _forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.schedule is None:
            total = torch.zeros((), device=inputs.device)
            for x, y in zip(
                inputs.split(self.micro_batch_size), labels.split(self.micro_batch_size)
            ):
                with self.autocast():
                    logits = self.module(x)
                loss = self.loss_fn(logits, y)
                if self.per_token_loss:
                    loss = loss * self._share_of_step(y)
                else:
                    loss = loss / self.micro_batches
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
