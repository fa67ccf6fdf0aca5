"""The decode step's norms as our own Triton kernels: a block's residual-add + RMSNorm
(norms.add_norm) and Mamba-2's gated group-wise RMSNorm (norms.gated_norm).

Between the decode step's matrix-vector products run ~80 norms of 2-4 us each (mamba-ssm's
Triton kernels before). Ours compute the same numbers (the residual sum rounded to x's dtype,
the norm in fp32 and rounded once), one program per row (per row and group for the gated norm),
and are ours so that they can take part in programmatic dependent launch (pdl.py): each waits
for the kernel before it, then at once lets the next product start streaming its weight while
it runs. gemv.decode_products() sends them the calls of 1-16 half-precision rows without
gradients on CUDA (or under Triton's interpreter); any other call runs as it would have.
"""

from collections.abc import Callable

import torch

from toolkit.inference.gemm_rows import MAX_ROWS
from toolkit.model import norms
from toolkit.model.kernels import triton_runs_on


def _rows_of(t: torch.Tensor, width: int) -> int:
    """M of t [..., width] taken as [M, width] with contiguous rows, where 1 <= M <= MAX_ROWS."""
    if t.dim() == 0 or t.size(-1) != width or t.stride(-1) != 1:
        return 0
    m = t.numel() // width
    return m if 1 <= m <= MAX_ROWS else 0


def _half_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """M of x [..., H] where our kernels take it: half precision as the norm's weight, on CUDA
    (or under the interpreter), no gradients, 1-16 rows; else 0."""
    if torch.is_grad_enabled() or not triton_runs_on(x.device):
        return 0
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return 0
    return _rows_of(x, weight.numel())


def takes_add_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: torch.nn.Module) -> bool:
    """Whether add_norm(x, residual, norm) goes to our kernel (an RMSNorm; see _half_rows)."""
    if type(norm) is not norms.RMSNorm:
        return False
    m = _half_rows(x, norm.weight)
    if residual is None:
        return m > 0
    return m > 0 and residual.dtype == x.dtype and residual.shape == x.shape


def add_norm(
    x: torch.Tensor, residual: torch.Tensor | None, norm: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """norms.add_norm's (norm(s), s), s = residual + x, through our kernel where it takes it."""
    if not takes_add_norm(x, residual, norm):
        return norms.add_norm(x, residual, norm)
    from toolkit.inference.decode_norms_kernel import launch_add_norm

    h = x.size(-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = None if residual is None else torch.empty_like(out)
    r = None if residual is None else residual.reshape(-1, h)
    launch_add_norm(x.reshape(-1, h), r, norm.weight, norm.eps, out.view(-1, h), total)
    return out, (x if total is None else total)


def takes_gated_norm(norm: torch.nn.Module, y: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether gated_norm(norm, y, z) goes to our kernel (a GatedRMSNorm; see _half_rows)."""
    if type(norm) is not norms.GatedRMSNorm:
        return False
    m = _half_rows(y, norm.weight)
    return m > 0 and z.dtype == y.dtype and z.shape == y.shape and z.stride(-1) == 1


def gated_norm(
    norm: torch.nn.Module,
    y: torch.Tensor,
    z: torch.Tensor,
    kernel: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """norms.gated_norm's norm(y, z) through our kernel where it takes it (else `kernel`'s, or
    the torch code's, as norms.gated_norm chooses)."""
    if not takes_gated_norm(norm, y, z):
        return norms.gated_norm(norm, y, z, kernel)
    from toolkit.inference.decode_norms_kernel import launch_gated_norm

    d = y.size(-1)
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    launch_gated_norm(
        y.reshape(-1, d), z.reshape(-1, d), norm.weight, norm.eps, norm.groups, out.view(-1, d)
    )
    return out
