"""The Mamba-2 mixer's training op with our causal conv (model.mamba_conv_backend "triton", and
"auto" where causal-conv1d does not import): in_proj's output in, the gated norm's output out,
in one autograd function.

It does what mamba-ssm's mamba_split_conv1d_scan_combined does for our mixer (no extra MLP
channels, no out_proj inside, the norm after the gate, no initial state, no sequence index):
SiLU(causal conv) of xBC, the chunked SSD with D and softplus(dt + dt_bias), and the group-wise
gated RMSNorm; the backward recomputes the conv's output instead of keeping it. The SSD and the
norm are mamba-ssm's Triton kernels, called as its op calls them; the conv is conv_kernel.py's,
which reads xBC in place in in_proj's output and writes its gradient straight into in_proj's
gradient.
"""

import torch

from toolkit.model.conv_kernel import conv_silu_backward, conv_silu_forward


def _views(
    zxbcdt: torch.Tensor, d_inner: int, conv_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [b, l, d_inner], xBC [b, l, conv_dim] and dt [b, l, heads]: views of in_proj's output."""
    heads = zxbcdt.size(-1) - d_inner - conv_dim
    return zxbcdt.split([d_inner, conv_dim, heads], dim=-1)


def _conv_inputs(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    head_dim: int,
    groups: int,
    d_inner: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """z, xBC and dt (views of in_proj's output) and the SSD's x, B and C from the conv's
    output: the forward's, and the backward's recompute of it."""
    z, xbc, dt = _views(zxbcdt, d_inner, conv_weight.size(0))
    conv = conv_silu_forward(xbc, conv_weight, conv_bias)
    return z, xbc, dt, split_xbc(conv, d_inner, head_dim, groups)


class ConvScanNorm(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight,
                chunk_size: int, head_dim: int, groups: int, eps: float):  # fmt: skip
        from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_fwd
        from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_fwd

        d_inner = D.size(0) * head_dim
        z, xbc, dt, (x, B, C) = _conv_inputs(zxbcdt, conv_weight, conv_bias, head_dim, groups,
                                             d_inner)  # fmt: skip
        y, *_ = _mamba_chunk_scan_combined_fwd(  # y with D's skip; no z: gated below
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True
        )
        out, _, rstd = _layer_norm_fwd(
            y.flatten(0, 1).flatten(-2), norm_weight, None, eps, z.flatten(0, 1),
            group_size=d_inner // groups, norm_before_gate=False, is_rms_norm=True,
        )  # fmt: skip
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, y, rstd)
        ctx.shape = (chunk_size, head_dim, groups, eps)
        return out.view(*zxbcdt.shape[:2], d_inner)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd
        from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd

        zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, y, rstd = ctx.saved_tensors
        chunk_size, head_dim, groups, eps = ctx.shape
        d_inner = D.size(0) * head_dim
        z, xbc, dt, (x, B, C) = _conv_inputs(zxbcdt, conv_weight, conv_bias, head_dim, groups,
                                             d_inner)  # fmt: skip
        dzxbcdt = torch.empty_like(zxbcdt)
        dz, dxbc_in, ddt = _views(dzxbcdt, d_inner, conv_weight.size(0))
        dxbc = torch.empty(xbc.shape, dtype=xbc.dtype, device=xbc.device)  # the conv's output's
        dx, dB, dC = split_xbc(dxbc, d_inner, head_dim, groups)
        dy, dnorm_weight, _, _ = _layer_norm_bwd(
            dout.flatten(0, 1), y.flatten(0, 1).flatten(-2), norm_weight, None, eps, None, rstd,
            z.flatten(0, 1), group_size=d_inner // groups, norm_before_gate=False,
            is_rms_norm=True, dz=dz.flatten(0, 1),
        )  # fmt: skip
        _, _, dA, _, _, dD, _, ddt_bias, _ = _mamba_chunk_scan_combined_bwd(
            dy.view_as(y), x, dt, A, B, C, y, chunk_size, D=D, dt_bias=dt_bias,
            dt_softplus=True, dx=dx, ddt=ddt, dB=dB, dC=dC,
        )  # fmt: skip
        _, dconv_weight, dconv_bias = conv_silu_backward(
            xbc, conv_weight, conv_bias, dxbc, dx=dxbc_in
        )
        return (dzxbcdt, dconv_weight, dconv_bias, ddt_bias, dA, dD, dnorm_weight,
                None, None, None, None)  # fmt: skip


def split_xbc(
    xbc: torch.Tensor, d_inner: int, head_dim: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [b, l, heads, head_dim], B and C [b, l, groups, state]: views of the conv's output
    (the mixer's torch path splits it so too)."""
    state = (xbc.size(-1) - d_inner) // (2 * groups)
    x, B, C = xbc.split([d_inner, groups * state, groups * state], dim=-1)
    return (
        x.unflatten(-1, (-1, head_dim)),
        B.unflatten(-1, (groups, state)),
        C.unflatten(-1, (groups, state)),
    )


def conv_scan_norm(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    chunk_size: int,
    head_dim: int,
    groups: int,
    eps: float,
) -> torch.Tensor:
    """gated_rmsnorm(SSD(SiLU(conv(xBC))), z) of in_proj's output zxbcdt [b, l, d_inner + conv
    channels + heads] -> [b, l, d_inner]; conv_weight [channels, k], A the decay (-exp(A_log)),
    D [heads]; the norm's `groups` are B's and C's."""
    return ConvScanNorm.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight,
                              chunk_size, head_dim, groups, eps)  # fmt: skip
