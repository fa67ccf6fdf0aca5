"""Weight gradients added into their fp32 `.grad` inside the backward (train.fused_grad_accumulation).

When a step accumulates micro-batches, autograd computes each linear's weight gradient as a bf16
product, casts it to a new fp32 tensor and then AccumulateGrad adds that into the gradient the
weight holds: 18 bytes of traffic a parameter for each micro-batch after the first. At the 8B's
shapes on an H200 the adds alone were 16.3 ms a micro-batch, the same in bf16 and FP8, so they
also cap FP8's ratio to bf16. Here, once a weight holds a gradient, its linear adds the product
into it from inside its own backward, where a compiled block fuses the cast into the add (10
bytes a parameter): Megatron's gradient-accumulation fusion, with the weight's `.grad` as the
buffer. A step's first micro-batch (no gradient yet) runs as plain autograd does, and so does
every linear outside a step's backward. Bit for bit the same numbers: the same bf16 products,
the same fp32 additions.

Covers plain `nn.Linear` (bf16 under autocast, or fp32) and the float8 linears of
train.fp8_weight_cache (toolkit.fp8_weight_cache); torchao's other float8 linears and
Transformer Engine's keep autograd's accumulation.

The input embedding too: autograd's backward for it writes a dense gradient of the whole table
(zeros, then the rows of the micro-batch's tokens) and AccumulateGrad adds that into `.grad`:
at a 256k vocabulary and d_model 4096, 17 GB of traffic a micro-batch for at most 8k rows that
change. Once the weight holds a gradient, its backward sums the rows per distinct token (with
embedding_dense_backward's kernel, in its order, on a table of one row per token) and adds only
those into `.grad`: the same sums, the same fp32 additions.

train.fp32_weight_grad_gemm: where the weight holds no gradient yet (a step's first micro-batch,
or its only one), the GEMM writes the fp32 gradient itself (cuBLAS's fp32-output GEMM,
aten::mm.dtype) instead of a bf16 product that a pass of its own casts and lays out as the
weight (read 2 bytes, write 4), and the products summed in fp32 without a rounding to bf16
between (Megatron's weight-gradient GEMM writes fp32 too). Not the same bits as autograd's, so a
key of its own. Alone level in speed at the 8B Mamba-2 widths on an H200 (202.7 against 203.2 ms
a step, 2026-12-05; its fp32-output GEMMs about as fast as the bf16 ones, profiles on two
H200s); with train.bf16_weight_cache the step casts nothing, 196.5 against 201.2 ms in one CUDA
graph (2026-12-06).
"""

import torch
import torch.nn.functional as F
from torch import nn

from toolkit import row_sparse_grad
from toolkit.model.norms import compute_dtype


def weight_grad_of(input_2d: torch.Tensor, grad_2d: torch.Tensor) -> torch.Tensor:
    """A linear's weight gradient ([out, in], contiguous) as autograd's mm backward computes it
    for F.linear's transposed weight (grad^T input), so that the products are the same bits and
    the layout the weight's: (input^T grad)^T, transposed, cost a transposing copy where
    autograd kept it (12 ms a step with train.bf16_weight_cache at the 8B Mamba-2 widths on an
    H200, 2026-12-05)."""
    return grad_2d.t() @ input_2d


def weight_grad_fp32(input_2d: torch.Tensor, grad_2d: torch.Tensor) -> torch.Tensor:
    """A linear's weight gradient ([out, in], contiguous) in fp32 as the GEMM writes it: the
    products summed in fp32, never rounded to the inputs' bf16 (train.fp32_weight_grad_gemm).
    On CUDA cuBLAS's fp32-output GEMM; elsewhere (CPUs: no such kernel) the same sums from fp32
    copies of the inputs, whose products are exact."""
    if grad_2d.is_cuda and grad_2d.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(grad_2d.t(), input_2d, out_dtype=torch.float32)
    return torch.mm(grad_2d.t().float(), input_2d.float())


def add_weight_grad(weight_grad: torch.Tensor, product: torch.Tensor) -> None:
    """`weight_grad += product`, the product's cast to the gradient's dtype inside the add."""
    weight_grad.add_(product)


class _LinearIntoGrad(torch.autograd.Function):
    """F.linear without bias whose weight gradient is added into `weight_grad` (the weight's
    `.grad`) in the backward instead of being returned; with `weight_grad` None, returned in
    the weight's dtype as autograd's cast would. `weight_cast`: the weight already in the
    compute dtype (train.bf16_weight_cache), else cast here. `fp32_gemm`: with `weight_grad`
    None, the gradient as weight_grad_fp32 writes it (train.fp32_weight_grad_gemm)."""

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor,
        weight_grad: torch.Tensor | None,
        weight_cast: torch.Tensor | None = None,
        fp32_gemm: bool = False,
    ) -> torch.Tensor:
        dtype = compute_dtype(input)  # autocast's rule for linear: both operands cast
        x = input.to(dtype)
        w = weight_cast if weight_cast is not None else weight.to(dtype)
        ctx.save_for_backward(x, w)
        # Held, not saved: saved tensors are version-checked, and where gradients are views of
        # one buffer (train.flat_optimizer) they share its version, which every add bumps.
        ctx.weight_grad = weight_grad
        ctx.input_dtype, ctx.weight_dtype = input.dtype, weight.dtype
        ctx.fp32_gemm = fp32_gemm
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        if ctx.weight_grad is None and ctx.fp32_gemm:
            grad_weight = weight_grad_fp32(x_2d, grad).to(ctx.weight_dtype)
        elif ctx.weight_grad is None:
            grad_weight = weight_grad_of(x_2d, grad).to(ctx.weight_dtype)
        else:
            add_weight_grad(ctx.weight_grad, weight_grad_of(x_2d, grad))
            grad_weight = None
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = (grad @ w).reshape(*grad_output.shape[:-1], w.shape[1])
            grad_input = grad_input.to(ctx.input_dtype)
        return grad_input, grad_weight, None, None, None


class LinearIntoGrad(nn.Linear):
    """nn.Linear (no bias) whose weight gradient, once the weight holds one, is added into it
    by its own backward (the module docstring says why); while `weight_cast` holds the weight
    in the compute dtype (toolkit.bf16_weight_cache), every product reads that; with
    `fp32_weight_grad_gemm`, a gradient it returns is weight_grad_fp32's."""

    weight_cast: torch.Tensor | None  # a buffer, registered by fuse_grad_accumulation
    fp32_weight_grad_gemm = False  # train.fp32_weight_grad_gemm, set by fuse_grad_accumulation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            return super().forward(input)
        grad, cast = self.weight.grad, getattr(self, "weight_cast", None)
        if cast is not None and cast.dtype != compute_dtype(input):
            cast = None  # autocast off (evaluation in fp32): cast as F.linear would
        fp32_gemm = self.fp32_weight_grad_gemm
        if grad is None and cast is None and not fp32_gemm:
            return super().forward(input)
        return _LinearIntoGrad.apply(input, self.weight, grad, cast, fp32_gemm)


def distinct_token_sums(tokens: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(rows, sums): the gradient rows `grad` [n, d] summed per distinct token of `tokens` [n]
    as embedding_dense_backward sums them for the whole table, and the table row each sum is
    for. Both have n rows whatever the tokens (no host sync, so a CUDA graph can hold it); rows
    past the distinct tokens' count are zeros for row 0. The tokens are ranked by a stable sort,
    which keeps each one's gradients in the order the whole table's backward adds them."""
    n = tokens.numel()
    ordered, order = tokens.sort(stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    rank = first.cumsum(0) - 1  # each sorted token's place among the distinct ones
    ranks = torch.empty_like(rank).scatter_(0, order, rank)  # in the tokens' own order
    sums = torch.ops.aten.embedding_dense_backward(grad, ranks, n, -1, False)
    rows = torch.zeros_like(ordered).scatter_(0, rank, ordered)
    return rows, sums


def add_embedding_grad(weight_grad: torch.Tensor, rows: torch.Tensor, sums: torch.Tensor) -> None:
    """`weight_grad[rows] += sums`, rows distinct but for the zero sums past the distinct
    tokens (adding zeros changes no value, so the atomic order does not matter)."""
    weight_grad.index_add_(0, rows, sums.to(weight_grad.dtype))


class _EmbeddingIntoGrad(torch.autograd.Function):
    """F.embedding (no padding index, no max norm) whose weight gradient is added into
    `weight_grad` (the weight's `.grad`) in the backward, a row per distinct token."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, weight: torch.Tensor, weight_grad: torch.Tensor):
        ctx.save_for_backward(tokens)
        ctx.weight_grad = weight_grad  # held, not saved: _LinearIntoGrad says why
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[None, None, None]:
        (tokens,) = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        add_embedding_grad(ctx.weight_grad, *distinct_token_sums(tokens.reshape(-1), grad))
        return None, None, None


def embedding_into_grad(tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding(tokens, weight), its weight gradient added into `weight.grad` by its own
    backward once the weight holds one (the module docstring says why); otherwise autograd's."""
    if weight.grad is None or not torch.is_grad_enabled() or not weight.requires_grad:
        return F.embedding(tokens, weight)
    return _EmbeddingIntoGrad.apply(tokens, weight, weight.grad)


class _EmbeddingRowSparse(torch.autograd.Function):
    """F.embedding whose backward, for a weight that holds no gradient yet, keeps it as the rows
    of the micro-batch's tokens (toolkit.row_sparse_grad); for one that does (a row-sparse one
    made whole first), adds those rows into `.grad`. Decided in the backward: what the weight
    holds then."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(tokens)
        ctx.weight = weight
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[None, None]:
        (tokens,) = ctx.saved_tensors
        weight = ctx.weight
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        rows, sums = distinct_token_sums(tokens.reshape(-1), grad)
        if weight.grad is None and row_sparse_grad.held_rows(weight) is None:
            row_sparse_grad.keep(weight, rows, sums)
        else:
            row_sparse_grad.densify_(weight)
            add_embedding_grad(weight.grad, rows, sums)
        return None, None


class EmbeddingIntoGrad(nn.Embedding):
    """nn.Embedding (no padding index, max norm, frequency scaling or sparse gradient) whose
    weight gradient, once the weight holds one, is added into it (embedding_into_grad); with
    `keeps_row_sparse_grad` (train.row_sparse_embedding_grad, set by parallelize), a step's
    first is kept as rows (_EmbeddingRowSparse)."""

    keeps_row_sparse_grad = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.keeps_row_sparse_grad and torch.is_grad_enabled() and weight.requires_grad:
            return _EmbeddingRowSparse.apply(input, weight)
        return embedding_into_grad(input, weight)


def _plain_embedding(module: nn.Module) -> bool:
    """An nn.Embedding itself with none of the options embedding_into_grad does not cover."""
    return type(module) is nn.Embedding and (
        module.padding_idx is None
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    )


# What computes as a plain nn.Linear (F.linear), fused accumulation or not: for the checks that
# tell a bf16 linear from a float8 or Transformer Engine one.
PLAIN_LINEARS = (nn.Linear, LinearIntoGrad)


def fuse_grad_accumulation(model: nn.Module, fp32_weight_grad_gemm: bool = False) -> list[str]:
    """Make the layers of `model` that can add their weight gradients into `.grad` in their
    backward do so: plain bias-free nn.Linear become LinearIntoGrad (with
    `fp32_weight_grad_gemm`, train.fp32_weight_grad_gemm's), plain nn.Embedding
    EmbeddingIntoGrad, train.fp8_weight_cache's float8 linears and the tensor-parallel
    embedding are told to. Returns their names."""
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = LinearIntoGrad
            module.fp32_weight_grad_gemm = fp32_weight_grad_gemm
            # A buffer, as compiled blocks read it (a new tensor each step, no recompile);
            # not persistent: never in checkpoints.
            module.register_buffer("weight_cast", None, persistent=False)
        elif _plain_embedding(module):
            module.__class__ = EmbeddingIntoGrad
        elif hasattr(module, "weight_grad_into_grad"):  # Float8LinearCastOnce, tp's embedding
            module.weight_grad_into_grad = True
        else:
            continue
        names.append(name)
    return names
