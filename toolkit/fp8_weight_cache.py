"""Float8 weights cast once per optimizer step (train.fp8_weight_cache: torchao, tensorwise).

torchao's Float8Linear casts its fp32 master weight to float8 in every forward and again in
every backward: an amax reduction over the weight and a cast, twice per micro-batch, though the
weights change only at the optimizer step. At the 8B's shapes on an H200 the amax reductions and
casts were 38 ms of a 215 ms micro-batch, the weights' share of them ~9-13 ms (4.3B parameters
read as fp32 several times over), and the recipe's global batch repeats them in each of its 8
micro-batches. Here each layer's weight is cast once when a step's forward and backward begin
(`cast_weights_once`, around StepRunner's micro-batches) and read from there by every forward
and backward of the step; its gradient still reaches the fp32 weight. Outside a step
(evaluation, generation) the layers cast as torchao's do.

The cast is kept in the two layouts the products take (row-major for the forward's,
column-major for the backward's gradient of the input), so no backward copies it. All the
weights' amaxes come from one multi-tensor pass, their scales from a few vector ops, and each
weight's two layouts from one more pass (compiled on CUDA): the fp32 weights are read twice a
step, where a cast per layer reads each twice and then copies its float8 bytes again.

The backward's weight-gradient product reads the input's float8 cast the forward made, where
torchao's backward casts the input again (an amax reduction over it and a cast: per linear, ~5
bytes an input element; a compiled block recomputes at most the cast's pointwise pass from what
it saves, no reduction). The same bits: tensorwise, the input's two casts are one scale of the
same tensor.

The same numbers as torchao's: tensorwise scaling takes one scale from the whole weight, the
same in the forward, the backward and every micro-batch, so the products read the same float8
values. Rowwise scaling casts the weight differently for its two products: refused (recipe).
"""

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingGranularity
from torchao.float8.float8_linear import Float8Linear
from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
from torchao.float8.float8_training_tensor import (
    Float8TrainingTensor,
    GemmInputRole,
    LinearMMConfig,
)
from torchao.float8.float8_utils import amax_to_scale, to_fp8_saturated

from toolkit.grad_accumulation import add_weight_grad


def _cast(
    t: torch.Tensor,
    role: GemmInputRole,
    cast: CastConfig,
    dim: int,
    mm_config: LinearMMConfig,
    config: Float8LinearConfig,
) -> torch.Tensor:
    """An activation or gradient cast as torchao's float8 matmul casts it."""
    return hp_tensor_to_float8_dynamic(
        t,
        cast.target_dtype,
        mm_config,
        gemm_input_role=role,
        scaling_granularity=cast.scaling_granularity,
        axiswise_dim=get_maybe_axiswise_dim(dim, cast.scaling_granularity),
        round_scales_to_power_of_2=config.round_scales_to_power_of_2,
    )


class _MatmulCastWeight(torch.autograd.Function):
    """torchao's float8 matmul (matmul_with_hp_or_float8_args: the same casts of the input and
    the output gradient, the same products) reading the weight's float8 cast in the two layouts
    its products take: row-major for the forward's, column-major for the backward's gradient of
    the input, where torchao's copies the float8 weight into that layout in every backward (2
    bytes a parameter a micro-batch). With `reuse_input_cast` the weight gradient's product
    reads the forward's float8 input, and it always reads the output gradient's cast made for
    the input's gradient, where those are the same bits (`_same_cast`; torchao casts each
    again: compiled, Inductor merges the gradient's two casts, not the input's).
    The weight gradient goes to the fp32 weight, or, given its `weight_grad`
    (train.fused_grad_accumulation), is added into that."""

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor,
        weight_fp8: torch.Tensor,
        weight_fp8_cm: torch.Tensor,
        mm_config: LinearMMConfig,
        config: Float8LinearConfig,
        weight_grad: torch.Tensor | None = None,
        reuse_input_cast: bool = False,
    ) -> torch.Tensor:
        ctx.mm_config, ctx.config = mm_config, config
        x = _cast(input, GemmInputRole.INPUT, config.cast_config_input, -1, mm_config, config)
        x = x.reshape(-1, x.shape[-1])
        ctx.reuse_input_cast = reuse_input_cast
        ctx.weight_grad = weight_grad  # held, not saved: toolkit.grad_accumulation says why
        ctx.save_for_backward(x if reuse_input_cast else input, weight_fp8_cm)
        out = torch.mm(x, weight_fp8.t())
        return out.reshape(*input.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c, mm = ctx.config, ctx.mm_config
        x, weight_cm = ctx.saved_tensors
        weight_grad = ctx.weight_grad
        if not ctx.reuse_input_cast:
            x = x.reshape(-1, x.shape[-1])
            x = _cast(x, GemmInputRole.INPUT, c.cast_config_input_for_grad_weight, 0, mm, c)
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        g = _cast(grad, GemmInputRole.GRAD_OUTPUT, c.cast_config_grad_output, -1, mm, c)
        grad_input = torch.mm(g, weight_cm).reshape(*grad_output.shape[:-1], -1)
        if not _same_cast(c.cast_config_grad_output, c.cast_config_grad_output_for_grad_weight):
            g = _cast(grad, GemmInputRole.GRAD_OUTPUT, c.cast_config_grad_output_for_grad_weight,
                      0, mm, c)  # fmt: skip
        grad_weight = torch.mm(g.t(), x)
        if weight_grad is not None:  # train.fused_grad_accumulation: into the held gradient
            add_weight_grad(weight_grad, grad_weight)
            grad_weight = None
        return grad_input, grad_weight, None, None, None, None, None, None


def _same_cast(cast: CastConfig, cast_for_grad_weight: CastConfig) -> bool:
    """Whether a tensor's cast for the weight gradient is its other cast, bit for bit: one
    tensorwise cast config for both (torchao's default; no axis, so the layout is irrelevant)."""
    return cast == cast_for_grad_weight and (
        cast.scaling_granularity is ScalingGranularity.TENSORWISE
    )


@functools.cache
def compiled_cast() -> Callable[..., torch.Tensor]:
    """torchao's cast compiled once for all weight shapes: the amax and the scaled cast fused
    into two passes over the fp32 weight. Eagerly it runs as several ops of a pass each: ~16 ms
    a step for the 8B's 4.3B float8 weights on an H200 (inferred from the cache's measured
    gain at 1 and at 8 micro-batches a step), against ~9 ms for two passes at HBM speed."""
    return torch.compile(hp_tensor_to_float8_dynamic, fullgraph=True, dynamic=True)


def _column_major(data: torch.Tensor) -> torch.Tensor:
    return data.t().contiguous().t()


@functools.cache
def compiled_column_major() -> Callable[[torch.Tensor], torch.Tensor]:
    """A float8 weight's bytes copied into the column-major layout, compiled (a tiled transpose
    for every shape): eagerly it is an unvectorised elementwise copy, 28.9 ms a step for the
    8B's 4.3B float8 weights on an H200 (~0.3 TB/s), which cancelled most of the cache's gain."""
    return torch.compile(_column_major, fullgraph=True, dynamic=True)


class Float8LinearCastOnce(Float8Linear):
    """torchao's Float8Linear that reads its weight's float8 cast from `weight_fp8` and
    `weight_fp8_cm` (row- and column-major; non-persistent buffers: not in checkpoints) while
    cast_weights_once holds them, and casts as Float8Linear does otherwise."""

    # The weight gradient's product reads the forward's float8 input where that is the same
    # bits; False: cast the input again in the backward, as torchao does (a benchmark's A/B).
    reuse_input_cast = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_fp8", None, persistent=False)
        self.register_buffer("weight_fp8_cm", None, persistent=False)  # column-major
        # train.fused_grad_accumulation: once the weight holds a gradient, add into it.
        self.weight_grad_into_grad = False

    def cast_weight(self, compiled: bool | None = None) -> torch.Tensor:
        """The weight in float8, cast as Float8Linear.forward casts it (tensorwise); through
        compiled_cast where `compiled` (default: on CUDA), the same bits."""
        c = self.config.cast_config_weight
        compiled = self.weight.is_cuda if compiled is None else compiled
        cast = compiled_cast() if compiled else hp_tensor_to_float8_dynamic
        return cast(
            self.weight.detach(),
            c.target_dtype,
            self.linear_mm_config,
            gemm_input_role=GemmInputRole.WEIGHT,
            scaling_granularity=c.scaling_granularity,
            round_scales_to_power_of_2=self.config.round_scales_to_power_of_2,
        )

    @staticmethod
    def column_major(weight_fp8: torch.Tensor, compiled: bool | None = None) -> torch.Tensor:
        """`weight_fp8` (a cast_weight) with its bytes in the column-major layout, the same
        scale; through compiled_column_major where `compiled` (default: on CUDA)."""
        compiled = weight_fp8.is_cuda if compiled is None else compiled
        if not compiled:
            return _column_major(weight_fp8)  # torchao's transpose and copy keep the scale
        return Float8TrainingTensor(
            compiled_column_major()(weight_fp8._data), weight_fp8._scale, weight_fp8._orig_dtype,
            weight_fp8._linear_mm_config, weight_fp8._gemm_input_role, weight_fp8._axiswise_dim,
        )  # fmt: skip

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight_fp8 is None:
            return super().forward(input)
        if torch.is_autocast_enabled():  # Float8Linear.forward's rule for the input
            input = input.to(torch.get_autocast_dtype("cuda"))
        into_grad = self.weight_grad_into_grad and torch.is_grad_enabled()
        weight_grad = self.weight.grad if into_grad else None
        c = self.config
        reuse = self.reuse_input_cast and _same_cast(
            c.cast_config_input, c.cast_config_input_for_grad_weight
        )
        output = _MatmulCastWeight.apply(
            input, self.weight, self.weight_fp8, self.weight_fp8_cm, self.linear_mm_config, c,
            weight_grad, reuse,
        )  # fmt: skip
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        return output


def _both_layouts(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` scaled and cast as torchao's cast does, row- and column-major."""
    data = to_fp8_saturated(weight.to(torch.float32) * scale, dtype)
    return data, data.t().contiguous().t()


@functools.cache
def compiled_both_layouts() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """_both_layouts compiled once for every weight shape: one pass that reads the fp32 weight
    and writes its float8 bytes in both layouts."""
    return torch.compile(_both_layouts, fullgraph=True, dynamic=True)


@torch.no_grad()
def cast_all(layers: list[Float8LinearCastOnce], compiled: bool | None = None) -> None:
    """Set each layer's `weight_fp8` and `weight_fp8_cm`: the bits and scale of its cast_weight
    and column_major. One multi-tensor pass takes every weight's amax (as torchao's
    max(abs(w)): a max is exact), vector ops their scales, and one pass per weight (through
    compiled_both_layouts where `compiled`, default on CUDA) writes its two layouts."""
    if not layers:
        return
    weights = [layer.weight.detach() for layer in layers]
    compiled = weights[0].is_cuda if compiled is None else compiled
    both = compiled_both_layouts() if compiled else _both_layouts
    amaxes = torch._foreach_norm(weights, ord=math.inf)
    keys = [
        (layer.config.cast_config_weight.target_dtype, layer.config.round_scales_to_power_of_2)
        for layer in layers
    ]
    scales: list[torch.Tensor | None] = [None] * len(layers)
    for dtype, round_to_power_of_2 in set(keys):  # one config in practice: a few ops in all
        picked = [i for i, key in enumerate(keys) if key == (dtype, round_to_power_of_2)]
        group = torch.stack([amaxes[i] for i in picked])
        group = amax_to_scale(group, dtype, round_to_power_of_2).unbind()
        for i, scale in zip(picked, group):
            scales[i] = scale
    for layer, weight, scale, (dtype, _) in zip(layers, weights, scales, keys):
        data, data_cm = both(weight, scale, dtype)
        layer.weight_fp8, layer.weight_fp8_cm = (
            Float8TrainingTensor(d, scale, weight.dtype, layer.linear_mm_config,
                                 GemmInputRole.WEIGHT, None)
            for d in (data, data_cm)
        )  # fmt: skip


@contextlib.contextmanager
def cast_weights_once(module: nn.Module) -> Iterator[int]:
    """Cast the weight of each Float8LinearCastOnce in `module` to float8 once, for the
    forwards and backwards run inside (one optimizer step's micro-batches); the casts are
    dropped on the way out, so nothing reads a weight cast before the next update. Yields how
    many weights it cast."""
    layers = [m for m in module.modules() if isinstance(m, Float8LinearCastOnce)]
    cast_all(layers)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.weight_fp8 = layer.weight_fp8_cm = None


def cast_once_linears(model: nn.Module) -> list[str]:
    """Replace each torchao Float8Linear in `model` by a Float8LinearCastOnce with the same
    weight Parameter and config; returns their names."""
    names = [name for name, m in model.named_modules() if type(m) is Float8Linear]
    for name in names:
        old = model.get_submodule(name)
        model.set_submodule(name, Float8LinearCastOnce.from_float(old, old.config))
    return names
