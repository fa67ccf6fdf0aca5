"""Validation loss: the mean loss over the first N held-out micro-batches. One function for the
trainer's `valid/loss` and for `python -m toolkit.evaluate`, so that the two numbers agree."""

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from toolkit.data.sampler import Samples
from toolkit.distributed import ParallelEnv
from toolkit.loss import counted_labels
from toolkit.parallel.pp import pipeline_forward
from toolkit.parallel.runtime import LossFn


@torch.no_grad()
def validation_loss(
    module: nn.Module,
    samples: Samples,
    loss_fn: LossFn,
    *,
    batches: int,
    micro_batch_size: int,
    autocast: Callable[[], AbstractContextManager],
    env: ParallelEnv | None = None,
    hidden_size: int = 0,
    sequence_shards: int = 1,
    per_token: bool = False,
) -> float:
    """Mean loss (nats per token) over the first `batches` micro-batches of `samples`, the same
    ones every time; summed in float64. Without `env`: the whole model in this one process. With
    it, the micro-batches are split over DP ranks, and under PP `module` is this rank's stage:
    each micro-batch goes forward through the stages in turn (activations `hidden_size` wide,
    1/`sequence_shards` of the sequence) and the last one computes the loss. Every rank returns
    the same number. Collective with `env`; `module`'s train/eval mode is left as it was.
    `per_token` (train.per_token_loss): one mean over every counted token of those
    micro-batches instead of the mean of their means."""
    dp_rank, dp, pp = (env.dp_rank, env.dp, env.pp) if env else (0, 1, 1)
    device = env.device if env else next(module.parameters()).device
    was_training = module.training
    module.eval()
    # The weighted sum of the micro-batches' means and the sum of their weights (1 each, or
    # their counted labels), so that one reduction serves PP and DP.
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(dp_rank, batches, dp):
        inputs, labels = samples.batch(i * micro_batch_size, micro_batch_size)
        if pp > 1:
            logits = pipeline_forward(
                module, env, inputs.to(device), hidden_size, autocast, sequence_shards
            )
        else:
            with autocast():
                logits = module(inputs.to(device))
        if logits is not None:
            labels = labels.to(device)
            weight = counted_labels(labels).sum().double() if per_token else 1.0
            sums[0] += loss_fn(logits, labels).double() * weight
            sums[1] += weight
    module.train(was_training)
    if pp > 1:  # only the last stage has a loss; every rank logs or returns the same number
        torch.distributed.all_reduce(sums, group=env.group("pp"))
    if dp > 1:
        torch.distributed.all_reduce(sums, group=env.group("dp"))
    total, weights = sums.tolist()
    return total / max(weights, 1.0)
