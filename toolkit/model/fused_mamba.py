"""The Mamba-2 mixer's training op of our own: in_proj's output in, the gated norm's output
out, in one autograd function. The mixer takes it for model.mamba_conv_backend "triton" (and
"auto" where causal-conv1d does not import) and for model.mamba_recompute = false; otherwise
it takes mamba-ssm's mamba_split_conv1d_scan_combined.

It does what that op does for our mixer (no extra MLP channels, no out_proj inside, the norm
after the gate, no initial state, no sequence index): SiLU(causal conv) of xBC, the chunked SSD
with D and softplus(dt + dt_bias), and the group-wise gated RMSNorm. The SSD and the norm are
mamba-ssm's Triton kernels, called as its op calls them, or ours where TRITON_MAMBA (below)
names them; the conv is causal-conv1d's or ours
(conv_kernel.py), either reading xBC in place in in_proj's output and writing its gradient
straight into in_proj's gradient.

With `recompute` (mamba-ssm's choice) the backward recomputes the conv's output and the SSD's
chunk states; without, the forward keeps them (the conv's output and the states passed
between chunks in bf16, dA's sums in each chunk and C Bt in fp32: 16 KB a token a layer at the
800M's widths) and the backward runs mamba-ssm's backward kernels on them, skipping the 5 kernels a
layer that made them again (RESULTS.md 2026-12-06, afternoon); by default the chunk states,
their gradients and B's and C's by our kernels (TRITON_MAMBA below).
"""

import os

import torch

from toolkit.model.conv_kernel import conv_silu_backward, conv_silu_forward
from toolkit.model.gated_norm_kernel import gated_norm_backward, gated_norm_forward
from toolkit.model.ssd_chunk_grad_kernel import (
    dA_grads,
    ssd_bc_grads,
    ssd_dt_grads,
    ssd_input_grads,
)
from toolkit.model.ssd_scan_kernel import ssd_forward_fused
from toolkit.model.ssd_state_grad_kernel import ssd_state_grads
from toolkit.model.ssd_states_kernel import ssd_states

# Our kernels in place of mamba-ssm's, by name, where the states are kept (all but the norm).
# On by default (each measured on an H100 at the 800M's widths, RESULTS.md 2026-12-07):
# "dstates" the chunk-state gradients (ssd_state_grad_kernel.py; 1.43x mamba-ssm's two
# kernels), "states" the forward's chunk states in one kernel before mamba-ssm's scan
# (ssd_states_kernel.py; 2.34x its three at micro-batch 8), "bc" B's and C's gradients and dA's
# through the states by our B/C kernels, x's and dA's within the chunks by mamba-ssm's (the SSD
# backward 1.20x by all its kernels' GPU time at micro-batch 8, 0.97x at the 8B's widths; a step
# 1.028x at micro-batch 4), "dt" with "bc" dA's rows summed into dt's gradient by one kernel
# (ssd_dt_grads; 180 fewer launches a micro-batch-4 step, 1.006x), "norm" the gated norm
# (gated_norm_kernel.py, also where the op recomputes the states; its backward 1.6x mamba-ssm's,
# a step 1.000-1.025x in three calls). For A/B runs: "ddacs" with "bc" dA's within the chunks by our
# dC kernel too (the SSD backward 0.92x "bc"'s), "forward" the SSD forward in one kernel
# (ssd_scan_kernel.py; 0.70x), "dx" all the backward's other gradients
# (ssd_chunk_grad_kernel.py; its head kernel 1.5x the time of mamba-ssm's two). "none": none.
DEFAULT_TRITON_MAMBA = "bc,dstates,states,dt,norm"
TRITON_MAMBA = frozenset(
    os.environ.get("TOOLKIT_TRITON_MAMBA", DEFAULT_TRITON_MAMBA).split(",")
) - {"", "none"}
if TRITON_MAMBA - {"norm", "forward", "states", "dstates", "dx", "bc", "ddacs", "dt"}:
    raise ValueError(f"TOOLKIT_TRITON_MAMBA: {os.environ['TOOLKIT_TRITON_MAMBA']!r}: names "
                     "are 'norm', 'forward', 'states', 'dstates', 'dx', 'bc', 'ddacs', 'dt' "
                     "and 'none', comma-separated")  # fmt: skip
for _part in ("ddacs", "dt"):
    if _part in TRITON_MAMBA and "bc" not in TRITON_MAMBA:
        raise ValueError(
            f"TOOLKIT_TRITON_MAMBA: {os.environ['TOOLKIT_TRITON_MAMBA']!r}: "
            f"{_part!r} reads our B/C kernels' dA rows: it goes with 'bc'"
        )
NORM_BACKEND = "triton" if "norm" in TRITON_MAMBA else "mamba_ssm"
# Where the states are kept, C Bt too (mamba-ssm's scan made it; its backward's dx and
# within-chunk dA kernels read it): the backward's C Bt kernel not run again, 0.10 ms a layer at
# the 800M's widths and micro-batch 8 on an H100 (RESULTS.md 2026-12-07), for 4 KB a token a
# layer there. TOOLKIT_MAMBA_KEEP_CB=0: made again, as before (for A/B runs).
KEEP_CB = os.environ.get("TOOLKIT_MAMBA_KEEP_CB", "1") != "0"
# The kept states passed between chunks in x's dtype (bf16 in training) instead of fp32: every
# kernel that reads them rounds them to it first (mamba-ssm's scan, as its own forward keeps
# them in bf16; its dC kernel; our B/C kernels), but for the state gradients' dA sum (fp32
# products of the rounded states here). Half their bytes kept, written once and read four times
# (the scan, the state gradients, our dC kernel's two blocks of rows): on an H100 at the 800M's
# widths a step 1.007x and 1.25 GB less at micro-batch 4, the SSD backward's GPU time 0.97x at
# micro-batch 8 (RESULTS.md 2026-12-07, late night). TOOLKIT_MAMBA_LOWP_STATES=0: fp32 (A/B).
LOWP_STATES = os.environ.get("TOOLKIT_MAMBA_LOWP_STATES", "1") != "0"


def kept_states_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the forward keeps the SSD's states in for the backward (LOWP_STATES)."""
    return x.dtype if LOWP_STATES else torch.float32


def _views(
    zxbcdt: torch.Tensor, d_inner: int, conv_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [b, l, d_inner], xBC [b, l, conv_dim] and dt [b, l, heads]: views of in_proj's output."""
    heads = zxbcdt.size(-1) - d_inner - conv_dim
    return zxbcdt.split([d_inner, conv_dim, heads], dim=-1)


def _channels_first(t: torch.Tensor) -> torch.Tensor:
    """[b, l, c] with adjacent channels as causal-conv1d's channel-last [b, c, l] view (its
    kernels want the row stride a multiple of 8: a copy where it is not)."""
    return (t if t.stride(1) % 8 == 0 else t.contiguous()).transpose(1, 2)


def conv_forward(
    xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """silu(causal depthwise conv(xBC) + bias) [b, l, c] by `backend`'s kernel ('triton' ours,
    'causal_conv1d' causal-conv1d's channel-last one, as mamba-ssm's op calls it)."""
    if backend == "triton":
        return conv_silu_forward(xbc, weight, bias)
    from causal_conv1d.cpp_functions import causal_conv1d_fwd_function

    out = causal_conv1d_fwd_function(_channels_first(xbc), weight, bias, None, None, None, True)
    return out.transpose(1, 2)


def conv_backward(
    xbc: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dout: torch.Tensor,
    dx: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """conv_forward's gradients: xBC's written into `dx` (a view of in_proj's gradient), the
    weight's and bias's returned in their dtypes."""
    if backend == "triton":
        return conv_silu_backward(xbc, weight, bias, dout, dx=dx)[1:]
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function

    target = _channels_first(dx)
    got, dweight, dbias, *_ = causal_conv1d_bwd_function(
        _channels_first(xbc), weight, bias, _channels_first(dout.contiguous()), None, None,
        None, target, False, True,
    )  # fmt: skip
    if target.data_ptr() != dx.data_ptr():
        dx.copy_(got.transpose(1, 2))
    return dweight.to(weight.dtype), None if dbias is None else dbias.to(bias.dtype)


def norm_forward(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gated RMSNorm of y [rows, channels] by z, 1/rms) by `backend`'s kernels ('triton' ours,
    gated_norm_kernel.py; 'mamba_ssm' its own, as its fused op calls them); z may be a slice of
    in_proj's output."""
    if backend == "triton":
        return gated_norm_forward(y, z, weight, groups, eps)
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_fwd

    out, _, rstd = _layer_norm_fwd(y, weight, None, eps, z, group_size=y.size(1) // groups,
                                   norm_before_gate=False, is_rms_norm=True)  # fmt: skip
    return out, rstd


def norm_backward(
    dout: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    eps: float,
    dz: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_forward's gradients: (y's, the weight's); z's written into `dz` (a view of
    in_proj's gradient). `rstd` is the same backend's."""
    dout = dout if dout.stride(1) == 1 else dout.contiguous()
    if backend == "triton":
        return gated_norm_backward(dout, y, z, weight, rstd, dz)
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd

    dy, dweight, _, _ = _layer_norm_bwd(
        dout, y, weight, None, eps, None, rstd, z, group_size=y.size(1) // groups,
        norm_before_gate=False, is_rms_norm=True, dz=dz,
    )  # fmt: skip
    return dy, dweight


def ssd_states_by_mamba_ssm(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    chunk_size: int,
    dt_bias: torch.Tensor,
    states_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ssd_states_kernel.ssd_states's contract by mamba-ssm's cumsum, chunk-state and
    state-passing kernels."""
    from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_fwd, _chunk_state_fwd
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_fwd

    dA_sums, dt_soft = _chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=dt_bias, dt_softplus=True)
    chunk_states = _chunk_state_fwd(B, x, dt_soft, dA_sums, states_in_fp32=True)
    states, _ = _state_passing_fwd(
        chunk_states.flatten(-2), dA_sums[:, :, :, -1], out_dtype=states_dtype
    )
    return dt_soft, dA_sums, states.unflatten(-1, chunk_states.shape[-2:])


def ssd_forward_keeping_states(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    keep_cb: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """mamba-ssm's SSD forward (y with D's skip; dt through softplus(dt + dt_bias)) by its
    kernels, the chunk states by ours where TRITON_MAMBA names "states", and what its backward
    would otherwise recompute: (dt after the softplus, dA's sums within each chunk, the states
    passed into each chunk [b, chunks, heads, p, n]) as the recompute makes them, in fp32 (the
    states in x's dtype with LOWP_STATES), and with `keep_cb` the C Bt products the scan read
    ([b, chunks, groups, chunk, chunk] fp32: 4 x groups x chunk bytes a token). The scan rounds
    the states to x's dtype as the combined forward's copy of them is rounded: the same
    output."""
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_fwd

    states_of = ssd_states if "states" in TRITON_MAMBA else ssd_states_by_mamba_ssm
    dt_soft, dA_sums, states = states_of(x, dt, A, B, chunk_size, dt_bias, kept_states_dtype(x))
    CB = _bmm_chunk_fwd(C, B, chunk_size, output_dtype=torch.float32)
    y, _ = _chunk_scan_fwd(CB, x, dt_soft, dA_sums, C, states, D=D)
    return y, (dt_soft, dA_sums, states, CB) if keep_cb else (dt_soft, dA_sums, states)


def ssd_backward_from_states(
    dy: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    kept: tuple[torch.Tensor, ...],
    dx: torch.Tensor,
    ddt: torch.Tensor,
    dB: torch.Tensor,
    dC: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ssd_forward_keeping_states from what it kept: x's, dt's (before the
    softplus), B's and C's written into the views given; (A's, D's, dt_bias's) returned. The
    kernels of mamba-ssm's combined backward in its order, less its recompute of the states
    (and of C Bt where it was kept), or ours where TRITON_MAMBA names them ("dstates", "dx"
    and "bc")."""
    kept, kept_cb = kept[:3], kept[3] if len(kept) > 3 else None
    dt_soft, dA_sums, states = kept
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    # ssd_chunk_grad_kernel's ("dx": all of it, "bc": its B/C kernels) read the kept states: no
    # bf16 copy of them where they run
    ours, bc = "dx" in TRITON_MAMBA, "bc" in TRITON_MAMBA
    if "dstates" in TRITON_MAMBA:
        dstates, ddA_chunk, states_lowp = ssd_state_grads(dy, C, dA_sums, states, not (ours or bc))
    else:
        dstates, ddA_chunk, states_lowp = ssd_state_grads_by_mamba_ssm(dy, C, dA_sums, states)
    if ours:
        return ssd_input_grads(
            x, dy, dt, A, dt_bias, D, kept, B, C, dstates, ddA_chunk, dx, ddt, dB, dC
        )
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_bwd, _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_scan import (
        _chunk_scan_bwd_dC,
        _chunk_scan_bwd_dcb,
        _chunk_scan_bwd_ddAcs_stable,
    )
    from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_bwd, _chunk_state_bwd_db
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx

    CB = (
        kept_cb
        if kept_cb is not None
        else _bmm_chunk_fwd(C, B, chunk_size, output_dtype=torch.float32)
    )
    _, ddt_soft, dD = _chunk_scan_chunk_state_bwd_dx(
        x, dt_soft, dA_sums, B, CB, dy, dstates, D=D, dx=dx
    )
    if bc:  # dA's gradient through the states, and with "ddacs" within the chunks, ours
        within = "ddacs" in TRITON_MAMBA
        rows = ssd_bc_grads(x, dy, kept, B, C, dstates, dB, dC, ddA_chunk, within)
        if not within:  # mamba-ssm's kernel for dA's part within the chunks
            rows = rows._replace(within=_chunk_scan_bwd_ddAcs_stable(x, dt_soft, dA_sums, dy, CB))
        if "dt" in TRITON_MAMBA:  # the rows summed and _chunk_cumsum_bwd's work: one kernel
            dA, ddt_bias = ssd_dt_grads(rows, ddt_soft, dt_soft, dt, A, dt_bias, ddt)
            return dA, dD, ddt_bias
        ddA = dA_grads(rows)
    else:
        groups = B.size(2)
        dB_part, ddA_next = _chunk_state_bwd_db(x, dt_soft, dA_sums, dstates, B=B, ngroups=groups)
        dC_part, ddA_prev = _chunk_scan_bwd_dC(states_lowp, dA_sums, dy, C=C, ngroups=groups)
        dCB = _chunk_scan_bwd_dcb(x, dt_soft, dA_sums, dy, ngroups=groups).to(CB.dtype)
        _bmm_chunk_bwd(C, dCB, residual=dB_part, out=dB)
        _bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_part, out=dC)
        ddA_prev[..., -1] += ddA_chunk
        ddA = _chunk_scan_bwd_ddAcs_stable(x, dt_soft, dA_sums, dy, CB)
        ddA += ddA_next + ddA_prev.flip([-1]).cumsum(dim=-1).flip([-1])
    _, dA, ddt_bias = _chunk_cumsum_bwd(
        ddA, ddt_soft, dt, A, dt_bias=dt_bias, dt_softplus=True, ddt=ddt
    )
    return dA, dD, ddt_bias


def ssd_state_grads_by_mamba_ssm(
    dy: torch.Tensor, C: torch.Tensor, dA_sums: torch.Tensor, states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ssd_state_grad_kernel.ssd_state_grads's contract by mamba-ssm's two kernels."""
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_bwd_dstates
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd

    shape = states.shape[-2:]
    dstates = _chunk_scan_bwd_dstates(C, dA_sums, dy, dtype=torch.float32)  # summed below
    dstates, ddA_chunk, _, states_lowp = _state_passing_bwd(
        states.flatten(-2), dA_sums[:, :, :, -1], dstates.flatten(-2), has_initial_states=False,
        dstates_dtype=dy.dtype, states_dtype=dy.dtype, chunk_size=dA_sums.size(-1),
    )  # fmt: skip
    return dstates.unflatten(-1, shape), ddA_chunk, states_lowp.unflatten(-1, shape)


class ConvScanNorm(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight,
                chunk_size: int, head_dim: int, groups: int, eps: float, conv_backend: str,
                recompute: bool):  # fmt: skip
        from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_fwd

        d_inner = D.size(0) * head_dim
        z, xbc, dt = _views(zxbcdt, d_inner, conv_weight.size(0))
        conv = conv_forward(xbc, conv_weight, conv_bias, conv_backend)
        x, B, C = split_xbc(conv, d_inner, head_dim, groups)
        if recompute:
            y, *_ = _mamba_chunk_scan_combined_fwd(  # y with D's skip; no z: gated below
                x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True
            )
            kept = ()
        else:
            args = (x, dt, A, B, C, chunk_size, D, dt_bias)
            if "forward" in TRITON_MAMBA:
                y, kept = ssd_forward_fused(*args, kept_states_dtype(x))
            else:  # C Bt for the backward's two kernels that read it (not "dx"'s)
                keep_cb = KEEP_CB and "dx" not in TRITON_MAMBA
                y, kept = ssd_forward_keeping_states(*args, keep_cb=keep_cb)
            kept = (conv, *kept)
        out, rstd = norm_forward(
            y.flatten(0, 1).flatten(-2), z.flatten(0, 1), norm_weight, groups, eps, NORM_BACKEND
        )
        ctx.save_for_backward(
            zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, y, rstd, *kept
        )
        ctx.shape = (chunk_size, head_dim, groups, eps, conv_backend)
        return out.view(*zxbcdt.shape[:2], d_inner)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd

        zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, y, rstd, *kept = (
            ctx.saved_tensors
        )
        chunk_size, head_dim, groups, eps, conv_backend = ctx.shape
        d_inner = D.size(0) * head_dim
        z, xbc, dt = _views(zxbcdt, d_inner, conv_weight.size(0))
        conv = kept[0] if kept else conv_forward(xbc, conv_weight, conv_bias, conv_backend)
        x, B, C = split_xbc(conv, d_inner, head_dim, groups)
        dzxbcdt = torch.empty_like(zxbcdt)
        dz, dxbc_in, ddt = _views(dzxbcdt, d_inner, conv_weight.size(0))
        dxbc = torch.empty(xbc.shape, dtype=xbc.dtype, device=xbc.device)  # the conv's output's
        dx, dB, dC = split_xbc(dxbc, d_inner, head_dim, groups)
        dy, dnorm_weight = norm_backward(
            dout.reshape(-1, d_inner), y.flatten(0, 1).flatten(-2), z.flatten(0, 1), norm_weight,
            rstd, groups, eps, dz.flatten(0, 1), NORM_BACKEND,
        )  # fmt: skip
        dy = dy.view_as(y)
        if kept:
            dA, dD, ddt_bias = ssd_backward_from_states(
                dy, x, dt, A, B, C, chunk_size, D, dt_bias, kept[1:], dx, ddt, dB, dC
            )
        else:
            _, _, dA, _, _, dD, _, ddt_bias, _ = _mamba_chunk_scan_combined_bwd(
                dy, x, dt, A, B, C, y, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                dx=dx, ddt=ddt, dB=dB, dC=dC,
            )  # fmt: skip
        dconv_weight, dconv_bias = conv_backward(
            xbc, conv_weight, conv_bias, dxbc, dxbc_in, conv_backend
        )
        return (dzxbcdt, dconv_weight, dconv_bias, ddt_bias, dA, dD, dnorm_weight,
                None, None, None, None, None, None)  # fmt: skip


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
    conv_backend: str = "triton",
    recompute: bool = True,
) -> torch.Tensor:
    """gated_rmsnorm(SSD(SiLU(conv(xBC))), z) of in_proj's output zxbcdt [b, l, d_inner + conv
    channels + heads] -> [b, l, d_inner]; conv_weight [channels, k], A the decay (-exp(A_log)),
    D [heads]; the norm's `groups` are B's and C's. `conv_backend`: 'triton' or
    'causal_conv1d'; `recompute`: the backward makes the conv's output and the SSD's states
    again (less memory) instead of keeping them from the forward."""
    return ConvScanNorm.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight,
                              chunk_size, head_dim, groups, eps, conv_backend,
                              recompute)  # fmt: skip
