"""A Triton product for decoding 2-16 rows: y = x W^T, the weight read once for all of them.

At batch 1 the decode step's products go through gemv.py's matrix-vector kernel; at batches
2-16 cuBLAS read the 8B hybrid's weights at 60-70% of HBM's bandwidth (5.05 / 5.47 / 5.86 ms a
token at batches 2 / 4 / 8 against 4.28 at batch 1 on an H200), though reading them once should
cost little more than at batch 1. This kernel streams the weight once, one program per BLOCK_N
weight rows and no split-K, each step a tl.dot of x's [16, BLOCK_K] (its rows padded to 16 by
masked loads: tl.dot's least M) against the weight's [BLOCK_K, BLOCK_N], in fp32 accumulators
rounded once to x's dtype; an MLP's activation (gelu, relu2) applied to the fp32 sums. On the
H200 it reads the weights 1.0-1.15x as fast as cuBLAS per shape, and the 8B decodes 5-7%
faster at batches 2-8 than with cuBLAS for these rows (benchmarks/RESULTS.md).

gemv.decode_products() sends it the products that gemv.takes would take but for holding 2-16
rows (x [..., K] taken as [M, K]). TOOLKIT_TRITON_ROWS=off keeps those on cuBLAS (the one-row
kernel stays); TOOLKIT_TRITON_GEMV=off turns both off. Its tile per weight shape comes from
benchmarks/gemv_sweep.py --rows (TILES); other shapes take DEFAULT's.
"""

import os
from typing import NamedTuple

import torch

MAX_ROWS = 16


class Tile(NamedTuple):
    block_n: int  # weight rows (output columns) per program
    block_k: int  # columns per step of a program's loop
    warps: int
    stages: int  # software pipelining of the loop's loads


# (out_features, in_features) -> the fastest of 21 tiles over 2, 4, 8 and 16 rows in
# benchmarks/gemv_sweep.py --rows on the H200 (benchmarks/RESULTS.md).
TILES: dict[tuple[int, int], Tile] = {
    (18560, 4096): Tile(64, 128, 4, 3),  # Mamba in_proj
    (4096, 8192): Tile(32, 512, 4, 4),  # Mamba out_proj
    (16384, 4096): Tile(64, 128, 4, 3),  # MLP fc1
    (4096, 16384): Tile(32, 512, 4, 4),  # MLP fc2
    (6144, 4096): Tile(64, 256, 4, 4),  # attention qkv
    (4096, 4096): Tile(32, 512, 4, 4),  # attention proj
    (256000, 4096): Tile(64, 256, 4, 3),  # output layer
}
DEFAULT = Tile(16, 256, 4, 3)


def tile_for(n: int, k: int) -> Tile:
    """TILES's, else DEFAULT's with its columns cut to the row's width (at least 16: tl.dot)."""
    if (n, k) in TILES:
        return TILES[n, k]
    return DEFAULT._replace(block_k=min(DEFAULT.block_k, max(16, 1 << (k - 1).bit_length())))


def enabled() -> bool:
    return os.environ.get("TOOLKIT_TRITON_ROWS", "auto") != "off"


def rows(x: torch.Tensor) -> int:
    """M of x [..., K] where this kernel is on and 2 <= M <= 16, else 0."""
    m = x.numel() // x.size(-1) if x.dim() and x.size(-1) else 0
    return m if 2 <= m <= MAX_ROWS and enabled() else 0


def gemm_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    tile: Tile | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """x [..., K] holding 2-16 rows, weight [N, K] (rows contiguous) -> [..., N] in x's dtype:
    the products summed in fp32 and rounded once; `activation` ('gelu', 'relu2') applied to the
    sums before the rounding."""
    n, k = weight.shape
    m = x.numel() // k if x.dim() and x.size(-1) == k else 0
    if not 1 <= m <= MAX_ROWS or weight.stride(1) != 1:
        raise ValueError(
            f"gemm_rows: 1-{MAX_ROWS} rows of {k} against a row-major weight, got {tuple(x.shape)}"
        )
    from toolkit.inference.gemm_rows_kernel import launch

    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    launch(weight, x2, y, tile or tile_for(n, k), activation)
    return y.view(*x.shape[:-1], n)
