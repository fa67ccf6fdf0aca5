"""The Triton kernels of decode_norms.py (imported on first use: Triton takes 0.3 s to import)."""

import torch
import triton
import triton.language as tl

from toolkit.inference import pdl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, H, stride_x, stride_r, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One row: s = r + x rounded to x's dtype (stored), out = s * rsqrt(mean(s^2) + eps) * w
    in fp32, rounded once."""
    if PDL:  # x and r are the kernels before's outputs; the next product may start loading
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    s = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0)
    if HAS_RESIDUAL:  # summed in fp32 and rounded once: torch's residual + x
        r = tl.load(r_ptr + row * stride_r + cols, mask=inside, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * H + cols, s, mask=inside)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + cols, (s * rstd * w).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gated_rms_norm_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr, D, GROUP, stride_y, stride_z, eps,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One row's group: g = y * silu(z), out = g * rsqrt(mean(g^2) + eps) * w in fp32, rounded
    once."""
    if PDL:  # y and z are the kernels before's outputs; the next product may start loading
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    cols = tl.program_id(1) * GROUP + offsets
    inside = offsets < GROUP
    y = tl.load(y_ptr + row * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * stride_z + cols, mask=inside, other=0.0).to(tl.float32)
    g = y * (z * tl.sigmoid(z))
    rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=0) / GROUP + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (g * rstd * w).to(out_ptr.dtype.element_ty), mask=inside)


def _block_and_warps(n: int) -> tuple[int, int]:
    """A power-of-two block over the row (or group) and ~256 elements a warp (mamba-ssm's)."""
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 8)


def launch_add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    total: torch.Tensor | None,
) -> None:
    """out [M, H] = rmsnorm(residual + x) and total [M, H] = residual + x (x, residual: [M, H]
    with contiguous rows; out, total contiguous; residual None: x normalised, total unused)."""
    m, h = x.shape
    block, warps = _block_and_warps(h)
    on = pdl.enabled(x.device)
    has_residual = residual is not None
    _add_rms_norm_kernel[(m,)](
        x, residual if has_residual else x, weight, out, total if has_residual else out, h,
        x.stride(0), residual.stride(0) if has_residual else 0, eps,
        HAS_RESIDUAL=has_residual, BLOCK=block, PDL=on, num_warps=warps, launch_pdl=on,
    )  # fmt: skip


def launch_gated_norm(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    groups: int,
    out: torch.Tensor,
) -> None:
    """out [M, D] = group-wise rmsnorm(y * silu(z)) over `groups` groups (y, z: [M, D] with
    contiguous rows; out contiguous)."""
    m, d = y.shape
    group = d // groups
    block, warps = _block_and_warps(group)
    on = pdl.enabled(y.device)
    _gated_rms_norm_kernel[(m, groups)](
        y, z, weight, out, d, group, y.stride(0), z.stride(0), eps,
        BLOCK=block, PDL=on, num_warps=warps, launch_pdl=on,
    )  # fmt: skip
