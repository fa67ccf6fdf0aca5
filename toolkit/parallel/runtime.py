"""What the training loop needs from the parallel layout, in one place: the loss, gradient
reduction over DP, clipping by the global norm, and the global (layout-free) state for checkpoints.
"""

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from toolkit.checkpoint import model_tensors, optimizer_tensors
from toolkit.distributed import ParallelEnv
from toolkit.model import HybridLM
from toolkit.parallel.tp import apply_tp, gather_from_tp, vocab_parallel_cross_entropy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def parallelize(model: HybridLM, env: ParallelEnv) -> LossFn:
    """Apply the layout to a freshly built (identical on every rank) model; returns the loss."""
    if env.pp > 1:
        raise NotImplementedError("parallel.pp > 1: pipeline parallelism is not implemented yet")
    if env.tp == 1:
        return cross_entropy
    group = env.group("tp")
    vocab_start = apply_tp(model, group=group, tp=env.tp, rank=env.tp_rank)
    return partial(vocab_parallel_cross_entropy, vocab_start=vocab_start, group=group)


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
    grads = [p for p in params if p.grad is not None]
    zero = torch.zeros((), dtype=torch.float64, device=env.device)
    sharded = sum(
        (p.grad.detach().double().square().sum() for p in grads if hasattr(p, "_tp_dim")), zero
    )
    replicated = sum(
        (p.grad.detach().double().square().sum() for p in grads if not hasattr(p, "_tp_dim")), zero
    )
    if env.tp > 1:
        dist.all_reduce(sharded, group=env.group("tp"))
    total = math.sqrt(float(sharded + replicated))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total


def global_state(
    model: HybridLM, optimizer: torch.optim.Optimizer, env: ParallelEnv
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parameters and optimizer state as global tensors, whatever the layout (collective)."""
    gather = partial(gather_from_tp, group=env.group("tp") if env.tp > 1 else None)
    return model_tensors(model, gather), optimizer_tensors(model, optimizer, gather)
