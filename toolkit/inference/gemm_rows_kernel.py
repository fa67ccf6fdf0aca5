"""The Triton kernel of gemm_rows.py (imported on first use: Triton takes 0.3 s to import)."""

import torch
import triton
import triton.language as tl

from toolkit.inference import pdl
from toolkit.inference.gemv_kernel import ACTIVATIONS, activate
from toolkit.model.kernels import triton_interprets

ROWS = 16  # tl.dot's least M: x's rows padded to it (masked loads of zeros)


@triton.jit
def _weight_tile(w_cols, k, n, N, K):
    return tl.load(
        w_cols + k[:, None],
        mask=(k < K)[:, None] & (n < N)[None, :],
        other=0.0,
        eviction_policy="evict_first",  # each weight is read once per step
    )


@triton.jit
def _tile_dot(x, w, acc, UPCAST: tl.constexpr):
    if UPCAST:  # Triton 3.9's interpreter gets bf16 tl.dot wrong
        return tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
    return tl.dot(x, w, acc)


@triton.jit
def _rows_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y, ACT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """y[:M, cols] = act(x[:M] @ w[cols, :]^T) for this program's BLOCK_N weight rows (the
    output's columns), summed in fp32 and rounded once. PDL (pdl.py): the first weight tile is
    loaded before waiting for the kernel that writes x."""
    m = tl.arange(0, ROWS)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + m[:, None] * stride_x
    w_cols = w_ptr + n[None, :].to(tl.int64) * stride_w  # [BLOCK_K, BLOCK_N] tiles of w^T
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    start = 0
    if PDL:  # the loop's first step, its weight loaded before the wait (nothing else is)
        w = _weight_tile(w_cols, ks, n, N, K)
        tl.extra.cuda.gdc_wait()
        x = tl.load(x_rows + ks[None, :], mask=(m < M)[:, None] & (ks < K)[None, :], other=0.0)
        acc = _tile_dot(x, w, acc, UPCAST)
        start = BLOCK_K
    for k0 in range(start, K, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_rows + k[None, :], mask=(m < M)[:, None] & (k < K)[None, :], other=0.0)
        w = _weight_tile(w_cols, k, n, N, K)
        acc = _tile_dot(x, w, acc, UPCAST)
    if PDL:  # the next kernel may start (and load its own weights) while this one ends
        tl.extra.cuda.gdc_launch_dependents()
    acc = activate(acc, ACT)
    y = y_ptr + m[:, None] * stride_y + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(m < M)[:, None] & (n < N)[None, :])


def launch(
    weight: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    tile,  # noqa: ANN001 - a gemm_rows.Tile
    activation: str | None = None,
) -> None:
    """y [M, N] = act(x [M, K] @ weight [N, K]^T) with gemm_rows.Tile `tile`, M <= 16 (x, y
    with rows of contiguous columns)."""
    n, k = weight.shape
    on = pdl.enabled(x.device)
    _rows_kernel[(triton.cdiv(n, tile.block_n),)](
        x, weight, y, x.size(0), n, k, x.stride(0), weight.stride(0), y.stride(0),
        ACT=ACTIVATIONS[activation], ROWS=ROWS, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        UPCAST=triton_interprets(), PDL=on,
        num_warps=tile.warps, num_stages=tile.stages, launch_pdl=on,
    )  # fmt: skip
