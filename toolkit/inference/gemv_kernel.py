"""The Triton kernel of gemv.py (imported on first use: Triton takes 0.3 s to import)."""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

ACTIVATIONS = {None: 0, "gelu": 1, "relu2": 2}
CONV = 3  # the ACT of the conv-step epilogue (launch's `conv`)


@triton.jit
def _gemv_kernel(
    w_ptr, x_ptr, y_ptr, N, K, stride_w, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVICT_FIRST: tl.constexpr,
    state_ptr, conv_w_ptr, conv_b_ptr, CONV_LO, CONV_DIM,
    D_CONV: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """y[rows] = act(w[rows, :] @ x) for this program's BLOCK_N rows, in fp32, rounded once.
    ACT 3 (CONV): rows CONV_LO + c (c < CONV_DIM) take Mamba's conv step instead, see _conv."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    inside = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = inside[:, None] & (k < K)[None, :]
        if EVICT_FIRST:  # each weight is read once per step: leave L2 to x and the rest
            w = tl.load(w_rows + k[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + k[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if ACT == 1:  # GELU, erf form (F.gelu's default)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 2:  # squared ReLU
        y = tl.maximum(y, 0.0)
        y = y * y
    elif ACT == 3:
        y = _conv(y.to(y_ptr.dtype.element_ty), rows - CONV_LO, inside, CONV_DIM,
                  state_ptr, conv_w_ptr, conv_b_ptr, D_CONV, HAS_BIAS)  # fmt: skip
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _conv(
    y, c, inside, CONV_DIM, state_ptr, w_ptr, b_ptr, D_CONV: tl.constexpr, HAS_BIAS: tl.constexpr
):  # fmt: skip
    """Mamba's conv step for channels c (rows outside [0, CONV_DIM) pass y through): the state
    [CONV_DIM, D_CONV] (row-major) shifts left by one, y its last column (in_proj's rounded
    output, as the reference keeps it); returns silu(bias + sum_j w[c, j] state[c, j]) of the
    new state, in fp32."""
    conv = inside & (c >= 0) & (c < CONV_DIM)
    c = tl.where(conv, c, 0).to(tl.int64)
    j = tl.arange(0, 4)[None, :]  # D_CONV <= 4, as causal-conv1d's
    at = c[:, None] * D_CONV + j
    last = j == D_CONV - 1
    state = tl.load(state_ptr + at + 1, mask=conv[:, None] & (j < D_CONV - 1), other=0.0)
    state = tl.where(last, y[:, None].to(state_ptr.dtype.element_ty), state)
    w = tl.load(w_ptr + at, mask=conv[:, None] & (j < D_CONV), other=0.0)
    out = tl.sum(w.to(tl.float32) * state.to(tl.float32), axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + c, mask=conv, other=0.0).to(tl.float32)
    # Threads of other warps may hold the same channels: every load before the first store.
    tl.debug_barrier()
    tl.store(state_ptr + at, state, mask=conv[:, None] & (j < D_CONV))
    return tl.where(conv, out / (1.0 + tl.exp(-out)), y.to(tl.float32))


class ConvStep(NamedTuple):
    """Mamba's conv step on rows [lo, lo + channels) of the product (launch's `conv`)."""

    state: torch.Tensor  # [1, channels, width], contiguous, y's dtype; updated in place
    weight: torch.Tensor  # [channels, width], contiguous
    bias: torch.Tensor | None  # [channels]
    lo: int


def launch(
    weight: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    tile,  # noqa: ANN001 - a gemv.Tile
    activation: str | None = None,
    conv: ConvStep | None = None,
) -> None:
    """y [N] = act(weight [N, K] @ x [K]) with gemv.Tile `tile` (x, y contiguous); with `conv`,
    its rows take the conv step (and its SiLU) instead of an activation."""
    n, k = weight.shape
    act = CONV if conv is not None else ACTIVATIONS[activation]
    _gemv_kernel[(triton.cdiv(n, tile.block_n),)](
        weight, x, y, n, k, weight.stride(0), ACT=act,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, EVICT_FIRST=tile.evict_first,
        **_conv_arguments(conv, y),
        num_warps=tile.warps, num_stages=tile.stages,
    )  # fmt: skip


def _conv_arguments(conv: ConvStep | None, y: torch.Tensor) -> dict:
    """The kernel's conv-step arguments; without `conv`, y's pointer for each (never read)."""
    if conv is None:
        return dict(state_ptr=y, conv_w_ptr=y, conv_b_ptr=y, CONV_LO=0, CONV_DIM=0, D_CONV=1,
                    HAS_BIAS=False)  # fmt: skip
    channels, width = conv.weight.shape
    if not 2 <= width <= 4:
        raise ValueError(f"gemv: conv widths 2 to 4, got {width}")
    bias = y if conv.bias is None else conv.bias
    return dict(state_ptr=conv.state, conv_w_ptr=conv.weight, conv_b_ptr=bias, CONV_LO=conv.lo,
                CONV_DIM=channels, D_CONV=width, HAS_BIAS=conv.bias is not None)  # fmt: skip
