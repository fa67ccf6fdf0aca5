"""Weights cast to the compute dtype once per optimizer step (train.bf16_weight_cache).

The weights are fp32 (the master copy) and autocast casts each linear's weight to bf16 in every
forward: 6 bytes of traffic a parameter (a read of 4, a write of 2) in each micro-batch, though
the weights change only at the optimizer step. At the 8B's shapes (28 layers: 4.3B parameters
in linears) that is ~26 GB a micro-batch, ~180 GB a step of 8 micro-batches of which 7 casts are
repeats. Megatron has no such cast: its model weights are bf16, the fp32 copy in its optimizer.
Here each linear's weight is cast once when a step's forward and backward begin
(`cast_weights_once`, around StepRunner's micro-batches) and every product of the step reads
that cast; the gradient still reaches the fp32 weight. The same numbers: the same cast, made
once. Outside a step (evaluation, generation) the linears cast as autocast does.

The linears are train.fused_grad_accumulation's (toolkit.grad_accumulation.LinearIntoGrad):
the key needs it. train.fp8_weight_cache is the same idea for float8 weights.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from toolkit.grad_accumulation import LinearIntoGrad


def cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight's cast, as autocast makes it."""
    return weight.detach().to(dtype)


@contextlib.contextmanager
def cast_weights_once(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> Iterator[int]:
    """Cast the weight of each LinearIntoGrad in `module` to `dtype` once, for the forwards and
    backwards run inside (one optimizer step's micro-batches); the casts are dropped on the way
    out, so nothing reads a weight cast before the next update. Yields how many it cast."""
    layers = [
        m for m in module.modules() if isinstance(m, LinearIntoGrad) and m.weight.requires_grad
    ]
    with torch.no_grad():
        for layer in layers:
            layer.weight_cast = cast(layer.weight, dtype)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.weight_cast = None
