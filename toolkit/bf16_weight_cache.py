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

Where the update is toolkit.triton_adamw's kernel, it writes the casts itself (UpdatedCasts): it
holds each new fp32 weight in registers anyway, so a bf16 copy kept between steps costs it 2
bytes a parameter, and the step then casts nothing: 4 bytes a parameter less a step than the
cast when it begins (at the 8B Mamba-2 widths, 1.9B parameters in linears, ~7.7 GB a step).
Measured there at one micro-batch a step (RESULTS.md 2026-12-06): level alone on an H200
(201.8 against 201.3 ms), the update writing the copies in 21.2 ms against 19.7 (30.2 before
adc6950 stored them from registers, not through shared memory); with
train.fp32_weight_grad_gemm no cast of a weight or a gradient is left, and in one CUDA graph
the step is 196.5 ms against 201.2 (H200), 212.3-212.5 against 216.7 (H100). Steps of several
micro-batches are not measured.

The linears are train.fused_grad_accumulation's (toolkit.grad_accumulation.LinearIntoGrad):
the key needs it. train.fp8_weight_cache is the same idea for float8 weights.
"""

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from toolkit.grad_accumulation import LinearIntoGrad


def cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight's cast, as autocast makes it."""
    return weight.detach().to(dtype)


def _stamp(weight: torch.Tensor) -> tuple[int, int]:
    """Where a weight is and its version counter: any in-place change through torch moves it."""
    return weight.data_ptr(), weight._version


class UpdatedCasts:
    """The weights' bf16 copies, kept between steps and written by the optimizer's update
    (TritonAdamW.write_casts). A copy counts as the weight's cast only while the weight is as the
    update left it (its address and version counter as written() recorded them); anything else
    that changes a weight in place (a checkpoint restore, a user's edit) moves its counter, and
    the next step casts it again."""

    def __init__(self) -> None:
        self._copies = WeakIdKeyDictionary()  # weight -> its bf16 copy
        self._stamps = WeakIdKeyDictionary()  # weight -> _stamp() when the update wrote it
        self.generation = 0  # counts the copies made: where none was, none are new

    def copy_of(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The copy the update is to write for `weight` (None: none yet)."""
        return self._copies.get(weight)

    def written(self, weights: Iterable[torch.Tensor]) -> None:
        """The update wrote these weights' copies from their new values."""
        for weight in weights:
            self._stamps[weight] = _stamp(weight)

    def take(self, weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """`weight`'s cast for a step: its copy as the last update wrote it, or cast now (into
        the copy, made on first use). Returns (the cast, whether it was cast here)."""
        copy = self._copies.get(weight)
        if copy is None or (copy.shape, copy.dtype, copy.device) != (
            weight.shape, dtype, weight.device
        ):  # fmt: skip
            copy = self._copies[weight] = torch.empty(
                weight.shape, dtype=dtype, device=weight.device
            )  # fmt: skip
            self._stamps.pop(weight, None)
            self.generation += 1
        if self._stamps.get(weight) == _stamp(weight):
            return copy, False
        copy.copy_(weight.detach())  # autocast's cast (to nearest even), into the copy
        return copy, True


@contextlib.contextmanager
def cast_weights_once(
    module: nn.Module, dtype: torch.dtype = torch.bfloat16, updated: UpdatedCasts | None = None
) -> Iterator[int]:
    """Cast the weight of each LinearIntoGrad in `module` to `dtype` once, for the forwards and
    backwards run inside (one optimizer step's micro-batches); the casts are dropped on the way
    out, so nothing reads a weight cast before the next update. With `updated`, the copies the
    update wrote are read instead, and only the others cast. Yields how many it cast."""
    layers = [
        m for m in module.modules() if isinstance(m, LinearIntoGrad) and m.weight.requires_grad
    ]
    casts = 0
    with torch.no_grad():
        for layer in layers:
            if updated is None:
                layer.weight_cast, cast_here = cast(layer.weight, dtype), True
            else:
                layer.weight_cast, cast_here = updated.take(layer.weight, dtype)
            casts += cast_here
    try:
        yield casts
    finally:
        for layer in layers:
            layer.weight_cast = None
