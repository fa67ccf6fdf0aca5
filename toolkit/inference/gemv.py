"""A Triton matrix-vector product for decoding one row: y = x W^T, the weight read once.

At batch 1 a decode step is matrix-vector products (3.94 of its 4.55 ms of kernels for the 8B
hybrid on an H200) and cuBLAS reads the weights at 2.7-4.1 TB/s against the 4.3 TB/s a plain
sum reads them at (benchmarks/RESULTS.md). This kernel streams [BLOCK_N, BLOCK_K] tiles of the
weight through fp32 accumulators, one program per BLOCK_N rows, no split-K (so no second
kernel to add partial sums). Its tile per weight shape comes from benchmarks/gemv_sweep.py on
the H200 (TILES); other shapes take the tile most of those chose.

`decode_products()` is a TorchFunctionMode that sends F.linear calls of one bf16/fp16 row on a
CUDA tensor, without gradients, bias or tensor subclasses, to the kernel; every other call runs
as it would have. The decoder enters it around the steps it records as CUDA graphs, so the
kernels are captured and replays pay nothing in Python. The model marks an MLP's fc1 and its
GELU or squared ReLU as one overridable function (mlp.linear_activation), which the mode runs
as one kernel, the activation applied to the sums (28 fewer kernels in the 8B's step).
Three other pairs measured slower on the H200 than their kernels apart (benchmarks/RESULTS.md),
each adding more to every program of the product than the small kernel it saved: Mamba-2's
gated norm folded into out_proj (per-group reductions), a block's residual-add + RMSNorm folded
into the next product (each program re-reading the residual and the norm's weight and summing
squares), and Mamba's conv step as in_proj's epilogue (each program's tail waiting on the conv
state's loads). On a CPU the kernel runs under Triton's interpreter
(TRITON_INTERPRET=1), which is how the tests check it. TOOLKIT_TRITON_GEMV=off keeps cuBLAS;
=plain takes the kernel for the products but not the activation's fusion. Products of 2-16
rows go to gemm_rows.py's kernel (TOOLKIT_TRITON_ROWS=off: to cuBLAS). The mode
also sends the norms between the products to our kernels (decode_norms.py), so that with the
products they can launch with PDL (pdl.py: each product streams its first weight tile while the
kernel before it ends); TOOLKIT_TRITON_PDL=off keeps mamba-ssm's norms and the usual launches.
"""

import contextlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from toolkit.grad_accumulation import PLAIN_LINEARS
from toolkit.inference import decode_norms, gemm_rows, pdl
from toolkit.model import norms
from toolkit.model.kernels import triton_imports, triton_runs_on
from toolkit.model.mlp import activate, linear_activation


class Tile(NamedTuple):
    block_n: int  # weight rows per program
    block_k: int  # columns per step of a program's loop
    warps: int
    stages: int
    evict_first: bool  # weights are read once: keep x, not them, in L2


# (out_features, in_features) -> the fastest of 136 tiles in benchmarks/gemv_sweep.py on the
# H200 (the 8B hybrid's shapes; GB/s read, ours against cuBLAS, in benchmarks/RESULTS.md).
TILES: dict[tuple[int, int], Tile] = {
    (18560, 4096): Tile(4, 2048, 4, 3, True),  # Mamba in_proj: 4229 against 3577
    (4096, 8192): Tile(16, 1024, 8, 3, True),  # Mamba out_proj: 3903 against 3292
    (16384, 4096): Tile(4, 2048, 4, 3, False),  # MLP fc1: 4182 against 4098
    (4096, 16384): Tile(4, 2048, 4, 1, True),  # MLP fc2: 4217 against 3924
    (6144, 4096): Tile(2, 1024, 4, 1, True),  # attention qkv: 3675 against 3259
    (4096, 4096): Tile(16, 1024, 8, 3, True),  # attention proj: 3431 against 2681
    (256000, 4096): Tile(4, 2048, 4, 3, True),  # output layer: 4660 against 4442
}


def tile_for(n: int, k: int) -> Tile:
    """TILES's, else the tile most shapes there chose, its columns cut to the row's width."""
    if (n, k) in TILES:
        return TILES[n, k]
    return Tile(4, min(2048, max(16, 1 << (k - 1).bit_length())), 4, 1, True)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    tile: Tile | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] (rows contiguous) -> [..., N] in x's dtype:
    the products summed in fp32 and rounded once, as cuBLAS's; `activation` ('gelu', 'relu2')
    applied to the sums before the rounding."""
    n, k = weight.shape
    if x.numel() != k or weight.stride(1) != 1:
        raise ValueError(f"gemv: one row of {k} against a row-major weight, got {tuple(x.shape)}")
    from toolkit.inference.gemv_kernel import launch

    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    launch(weight, x.contiguous(), y, tile or tile_for(n, k), activation)
    return y


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = 1) -> bool:
    """Whether F.linear(x, weight, bias) goes to the kernel: one half-precision row (`rows`
    of them: gemm_rows.py's), on CUDA (or under the interpreter), no bias, no gradients, plain
    tensors of one dtype."""
    return (
        bias is None
        and not torch.is_grad_enabled()
        and _plain(x)
        and _plain(weight)
        and triton_runs_on(x.device)
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and x.shape[-1:] == weight.shape[1:]
        and x.numel() == rows * weight.size(1)
        and weight.stride(1) == 1
    )


class _DecodeProducts(TorchFunctionMode):
    """F.linear, and an MLP's fc1 with its activation (marked overridable by the model), through
    the kernel where `takes` says so (or gemm_rows.py's, for 2-16 rows); the norms between them
    (marked overridable too) through decode_norms.py's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.linear:
            return self.linear(*args, **kwargs)
        if func is linear_activation:
            return self.linear_activation(*args)
        if func is norms.add_norm and pdl.our_norms():
            return decode_norms.add_norm(*args, **kwargs)
        if func is norms.gated_norm and pdl.our_norms():
            return decode_norms.gated_norm(*args, **kwargs)
        return func(*args, **kwargs)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        y = _kernel_product(x, weight, bias)
        return F.linear(x, weight, bias) if y is None else y

    def linear_activation(self, linear: nn.Module, x: torch.Tensor, activation: str):
        fuse = os.environ.get("TOOLKIT_TRITON_GEMV", "auto") != "plain"
        if fuse and type(linear) in PLAIN_LINEARS:  # a trained model's too
            y = _kernel_product(x, linear.weight, linear.bias, activation)
            if y is not None:
                return y
        with self:  # its product may still come here
            return activate(linear(x), activation)


def _kernel_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None
) -> torch.Tensor | None:
    """act(x W^T) through the one-row kernel, or gemm_rows.py's for 2-16 rows, where `takes`
    says so; None where neither takes it."""
    rows = gemm_rows.rows(x) or 1
    if not takes(x, weight, bias, rows):
        return None
    if rows == 1:
        return gemv(x, weight, activation=activation)
    return gemm_rows.gemm_rows(x, weight, activation=activation)


def enabled() -> bool:
    return os.environ.get("TOOLKIT_TRITON_GEMV", "auto") != "off"


@contextlib.contextmanager
def decode_products(on: bool = True) -> Iterator[None]:
    """Inside: one-row F.linear calls run through the kernel (see the module's docstring).
    `on=False`, or TOOLKIT_TRITON_GEMV=off, or no Triton: a no-op."""
    if not (on and enabled() and triton_imports()):
        yield
        return
    with _DecodeProducts():
        yield
