"""The Mamba-2 mixer's gated RMSNorm in Triton: out = g / rms(g) * weight with g = y * silu(z),
the rms taken over each group of channels.

Each pass reads its rows once: the forward y and z, writing out and each row-group's 1/rms; the
backward y, z, the output's gradient and 1/rms, writing y's gradient and z's (into the view of
in_proj's gradient it is given), and the weight's gradient summed per program in registers. In
fp32 inside, bf16 or fp32 outside, as mamba-ssm's norm kernels, whose backward took ~2.5x its
bytes' time at the 800M's widths on an H100 (RESULTS.md 2026-12-06 afternoon). Written for our
fused training op (fused_mamba.py), which takes them by default (TOOLKIT_TRITON_MAMBA's "norm",
since 2026-12-07 night: the backward 0.335 against mamba-ssm's 0.538 ms at the 800M's widths and
micro-batch 8 on an H100, a step 1.000-1.025x in three calls; tests/test_gated_norm_kernel.py,
benchmarks/gated_norm.py).
"""

import torch

from toolkit.model.kernels import triton_imports

ELEMENTS_PER_TILE = 8192  # rows x channels of a forward tile: 32 rows of a 256-channel group
# The backward's tile: 16 rows of a group (0.43 ms against 0.52-0.58 at 32 rows at the 800M's
# widths and micro-batch 8 on an H100, RESULTS.md 2026-12-07 late morning; mamba-ssm's 0.55)
BACKWARD_ELEMENTS_PER_TILE = 4096
ROWS_PER_PROGRAM = 512  # backward: rows a program walks, summing the weight's gradient
FORWARD_WARPS = 4
BACKWARD_WARPS = 4
# (benchmarks/gated_norm.py --sweep times other settings of these four)

if triton_imports():
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(ptr, rows, row_stride, cols, ok):
        """A [rows, cols] tile in fp32 (0 where not ok); 64-bit row offsets."""
        return tl.load(ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], ok, 0.0).to(
            tl.float32
        )

    @triton.jit
    def _gated_norm_fwd_kernel(y, z, weight, out, rstd, M, N, stride_y, stride_z, stride_out, eps,
                               GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                               BLOCK_GROUP: tl.constexpr):  # fmt: skip
        group = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = group * GROUP + tl.arange(0, BLOCK_GROUP)
        row_ok = rows < M
        ok = row_ok[:, None] & (tl.arange(0, BLOCK_GROUP) < GROUP)[None, :]
        zv = _tile(z, rows, stride_z, cols, ok)
        g = _tile(y, rows, stride_y, cols, ok) * zv * tl.sigmoid(zv)
        r = 1.0 / tl.sqrt(tl.sum(g * g, axis=1) / GROUP + eps)
        tl.store(rstd + rows.to(tl.int64) * (N // GROUP) + group, r, row_ok)
        w = tl.load(weight + cols, cols < N, 0.0).to(tl.float32)
        result = g * r[:, None] * w[None, :]
        at = out + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(at, result.to(out.dtype.element_ty), ok)

    @triton.jit
    def _gated_norm_bwd_kernel(y, z, weight, dout, rstd, dy, dz, dweight_part, M, N, stride_y,
                               stride_z, stride_dout, stride_dy, stride_dz,
                               GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                               BLOCK_GROUP: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        part, group = tl.program_id(0), tl.program_id(1)
        cols = group * GROUP + tl.arange(0, BLOCK_GROUP)
        col_ok = tl.arange(0, BLOCK_GROUP) < GROUP
        w = tl.load(weight + cols, col_ok, 0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_ROWS, BLOCK_GROUP], dtype=tl.float32)  # summed over rows at the end
        for start in range(part * ROWS, part * ROWS + ROWS, BLOCK_ROWS):
            rows = start + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < M
            ok = row_ok[:, None] & col_ok[None, :]
            yv = _tile(y, rows, stride_y, cols, ok)
            zv = _tile(z, rows, stride_z, cols, ok)
            do = _tile(dout, rows, stride_dout, cols, ok)
            r = tl.load(rstd + rows.to(tl.int64) * (N // GROUP) + group, row_ok, 0.0)
            s = tl.sigmoid(zv)
            gate = zv * s
            normed = yv * gate * r[:, None]
            dw += do * normed
            dnormed = do * w[None, :]
            mean = tl.sum(dnormed * normed, axis=1) / GROUP
            dg = r[:, None] * (dnormed - normed * mean[:, None])
            offsets = rows.to(tl.int64)[:, None]
            tl.store(
                dy + offsets * stride_dy + cols[None, :], (dg * gate).to(dy.dtype.element_ty), ok
            )
            dzv = dg * yv * s * (1.0 + zv * (1.0 - s))
            tl.store(dz + offsets * stride_dz + cols[None, :], dzv.to(dz.dtype.element_ty), ok)
        tl.store(dweight_part + part.to(tl.int64) * N + cols, tl.sum(dw, axis=0), col_ok)


def _shape(
    y: torch.Tensor, z: torch.Tensor, groups: int, elements: int
) -> tuple[int, int, int, int]:
    """(rows, channels, channels a group, rows a tile of `elements`) of [rows, channels] views."""
    M, N = y.shape
    if z.shape != y.shape or y.stride(1) != 1 or z.stride(1) != 1 or N % groups:
        raise ValueError(f"y and z must be [rows, {N}] with adjacent channels, {groups} groups")
    group = N // groups
    block_group = triton.next_power_of_2(group)
    return M, N, group, max(1, elements // block_group)


def gated_norm_forward(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [rows, channels] contiguous in y's dtype, 1/rms [rows, groups] fp32) of y and z
    [rows, channels] (any row strides: z is a slice of in_proj's output)."""
    M, N, group, block_rows = _shape(y, z, groups, ELEMENTS_PER_TILE)
    out = torch.empty(M, N, dtype=y.dtype, device=y.device)
    rstd = torch.empty(M, groups, dtype=torch.float32, device=y.device)
    grid = (triton.cdiv(M, block_rows), groups)
    _gated_norm_fwd_kernel[grid](
        y, z, weight, out, rstd, M, N, y.stride(0), z.stride(0), out.stride(0), eps,
        GROUP=group, BLOCK_ROWS=block_rows, BLOCK_GROUP=triton.next_power_of_2(group),
        num_warps=FORWARD_WARPS,
    )  # fmt: skip
    return out, rstd


def gated_norm_backward(
    dout: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dz: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y's gradient [rows, channels] contiguous, the weight's gradient in its dtype); z's is
    written into `dz` ([rows, channels] with adjacent channels: the fused op's view of in_proj's
    gradient)."""
    groups = rstd.size(1)
    M, N, group, block_rows = _shape(y, z, groups, BACKWARD_ELEMENTS_PER_TILE)
    if dout.shape != y.shape or dout.stride(1) != 1 or dz.shape != y.shape or dz.stride(1) != 1:
        raise ValueError(f"dout and dz must be [{M}, {N}] with adjacent channels")
    rows = max(block_rows, ROWS_PER_PROGRAM // block_rows * block_rows)
    parts = triton.cdiv(M, rows)
    dy = torch.empty(M, N, dtype=y.dtype, device=y.device)
    dweight_part = torch.empty(parts, N, dtype=torch.float32, device=y.device)
    _gated_norm_bwd_kernel[(parts, groups)](
        y, z, weight, dout, rstd, dy, dz, dweight_part, M, N, y.stride(0), z.stride(0),
        dout.stride(0), dy.stride(0), dz.stride(0), GROUP=group, BLOCK_ROWS=block_rows,
        BLOCK_GROUP=triton.next_power_of_2(group), ROWS=rows, num_warps=BACKWARD_WARPS,
    )  # fmt: skip
    return dy, dweight_part.sum(0).to(weight.dtype)
