"""The Triton kernel of gemv.py (imported on first use: Triton takes 0.3 s to import)."""

import torch
import triton
import triton.language as tl

from toolkit.inference import pdl

ACTIVATIONS = {None: 0, "gelu": 1, "relu2": 2}


@triton.jit
def activate(y, ACT: tl.constexpr):
    """ACTIVATIONS's activation ACT of fp32 sums y (also gemm_rows_kernel's)."""
    if ACT == 1:  # GELU, erf form (F.gelu's default)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 2:  # squared ReLU
        y = tl.maximum(y, 0.0)
        y = y * y
    return y


@triton.jit
def _weight_tile(w_rows, k, inside, K, EVICT_FIRST: tl.constexpr):
    mask = inside[:, None] & (k < K)[None, :]
    if EVICT_FIRST:  # each weight is read once per step: leave L2 to x and the rest
        return tl.load(w_rows + k[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(w_rows + k[None, :], mask=mask, other=0.0)


@triton.jit
def _gemv_kernel(
    w_ptr, x_ptr, y_ptr, N, K, stride_w, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVICT_FIRST: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y[rows] = act(w[rows, :] @ x) for this program's BLOCK_N rows, in fp32, rounded once.
    PDL (pdl.py): the first weight tile is loaded before waiting for the kernel that writes x."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    inside = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    start = 0
    if PDL:  # the loop's first step, its weight loaded before the wait (nothing else is)
        w = _weight_tile(w_rows, cols, inside, K, EVICT_FIRST)
        tl.extra.cuda.gdc_wait()
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        start = BLOCK_K
    for k0 in range(start, K, BLOCK_K):
        k = k0 + cols
        w = _weight_tile(w_rows, k, inside, K, EVICT_FIRST)
        x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    if PDL:  # the next kernel may start (and load its own weights) while this one ends
        tl.extra.cuda.gdc_launch_dependents()
    y = activate(tl.sum(acc, axis=1), ACT)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=inside)


def launch(
    weight: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    tile,  # noqa: ANN001 - a gemv.Tile
    activation: str | None = None,
) -> None:
    """y [N] = act(weight [N, K] @ x [K]) with gemv.Tile `tile` (x, y contiguous)."""
    n, k = weight.shape
    on = pdl.enabled(x.device)
    _gemv_kernel[(triton.cdiv(n, tile.block_n),)](
        weight, x, y, n, k, weight.stride(0), ACT=ACTIVATIONS[activation],
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, EVICT_FIRST=tile.evict_first, PDL=on,
        num_warps=tile.warps, num_stages=tile.stages, launch_pdl=on,
    )  # fmt: skip
