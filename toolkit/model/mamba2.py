"""The Mamba-2 mixer: in_proj, causal conv, SSD, gated norm, out_proj, and its one-token decode
step. The SSD itself is ssd.py's reference or a GPU kernel that kernels.py chose.

Shapes: batch b, length l, heads h, head dim p, groups g, state n. in_proj rows are ordered
[z, x, B, C, dt] (DESIGN.md section 2); head h reads B and C of group h // (heads / groups).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.model.fused_mamba import conv_scan_norm, split_xbc
from toolkit.model.kernels import PrefillKernels, decode_kernels, prefill_kernels
from toolkit.model.norms import GatedRMSNorm, gated_norm
from toolkit.model.ssd import SSDFunction, ssd_chunked, ssd_step


@dataclass
class MambaState:
    """Decode state of one Mamba layer: the last d_conv pre-conv columns and the SSM state."""

    conv: torch.Tensor  # [b, conv_dim, d_conv]
    ssm: torch.Tensor  # [b, heads, head_dim, d_state], fp32 (or bf16 if asked for decode)
    seen: int = 0  # tokens consumed so far
    # Prefill of padded pieces: each row's real positions in the piece [b] (the rest is padding
    # that leaves the row's state as it was); None: every position is real.
    valid: torch.Tensor | None = None

    # The decode-state methods (toolkit/model/states.py); the size does not depend on the length.
    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    def rows(
        self,
        n: int,
        seen: int = 0,
        valid: torch.Tensor | None = None,
        shared: dict | None = None,
    ) -> "MambaState":
        """The first n rows (a view, no copy), having consumed `seen` tokens; `valid`: see
        the field. `shared` (one forward's scratch) serves attention only."""
        return MambaState(self.conv[:n], self.ssm[:n], seen=seen, valid=valid)

    def decode_rows(
        self,
        n: int,
        positions: torch.Tensor,
        span: int | None = None,
        shared: dict | None = None,
    ) -> "MambaState":
        """The first n rows for one token each at any positions: seen > 0 is the step path."""
        return MambaState(self.conv[:n], self.ssm[:n], seen=1)

    def copy_row(self, row: int, source: "MambaState", source_row: int, length: int) -> None:
        self.conv[row].copy_(source.conv[source_row])
        self.ssm[row].copy_(source.ssm[source_row])

    def copy_rows(
        self, rows: torch.Tensor, source: "MambaState", source_rows: torch.Tensor, length: int
    ) -> None:
        self.conv[rows] = source.conv[source_rows].to(self.conv.dtype)
        self.ssm[rows] = source.ssm[source_rows].to(self.ssm.dtype)


def _channel_last(xt: torch.Tensor, width: int) -> bool:
    """Whether causal-conv1d's channel-last kernel takes xt [b, c, l] as it is: channels adjacent
    in memory, 8 at a time (strides in multiples of 8 elements, a 16-byte aligned start), and a
    width of 2 to 4. A slice of in_proj's output is, for the usual widths."""
    return (
        xt.stride(1) == 1
        and xt.size(1) % 8 == 0
        and xt.stride(0) % 8 == 0
        and xt.stride(2) % 8 == 0
        and xt.data_ptr() % 16 == 0
        and 2 <= width <= 4
    )


def causal_conv(
    xbc: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None = None,
    continuing: bool = False,
    conv_fn: Callable[..., torch.Tensor] | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """SiLU(depthwise causal conv) of xbc [b, l, c] -> [b, l, c]; weight [c, k]. The left context
    is the last k - 1 columns of `conv_state` [b, c, k] when `continuing` (a sequence resumed
    from its decode state), zeros otherwise; `conv_state`, when given, then takes the last k
    columns of [left context, xbc^T], as the decode step keeps it; with `valid` [b] (each row's
    real positions, padding after them), the last k columns before each row's padding.

    `conv_fn`: causal-conv1d's causal_conv1d_fn, when xbc^T is channel-last (see
    _channel_last). It reads the left context itself (no copy of the state and the piece into
    one tensor) and applies the SiLU, and its output is channel-last: [b, l, c] contiguous, which
    the SSD kernels read without a transposing copy. Otherwise (and on CPUs) the torch code: the
    reference."""
    k = weight.size(-1)
    xt = xbc.transpose(1, 2)  # [b, c, l]
    left = conv_state[..., 1:].to(xt.dtype) if continuing else None  # a view in the same dtype
    if conv_fn is not None and _channel_last(xt, k):
        b, c, _ = xt.shape
        if left is not None:  # its initial states are read channel-last only
            left = xt.new_empty(b, k - 1, c).transpose(1, 2).copy_(left)
        if conv_state is not None:
            head = left if left is not None else xt.new_zeros(b, c, k - 1)
            if valid is None:  # 2k - 1 columns, not the whole piece
                conv_state.copy_(torch.cat([head, xt[..., -k:]], dim=-1)[..., -k:])
            else:
                padded = torch.cat([head, xt], dim=-1)
                _keep_columns_before_padding(conv_state, padded, valid, continuing)
        return conv_fn(xt, weight, bias, initial_states=left, activation="silu").transpose(1, 2)
    if left is not None:
        padded = torch.cat([left, xt], dim=-1)
    else:
        padded = F.pad(xt, (k - 1, 0))
    if conv_state is not None and valid is None:
        conv_state.copy_(padded[..., -k:])  # padded has >= k columns
    elif conv_state is not None:
        _keep_columns_before_padding(conv_state, padded, valid, continuing)
    out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=xt.size(1))
    return F.silu(out).transpose(1, 2)


def _keep_columns_before_padding(
    conv_state: torch.Tensor, padded: torch.Tensor, valid: torch.Tensor, continuing: bool
) -> None:
    """conv_state [b, c, k] <- each row's last k columns of `padded` ([left context, piece],
    k - 1 + l columns) before its padding: those of column valid[row] - 1 of the piece and the
    k - 1 before it. A row with valid 0 keeps its state."""
    k = conv_state.size(-1)
    first = conv_state[..., :1].to(padded.dtype) if continuing else padded[..., :1]
    columns = torch.cat([first, padded], dim=-1)
    index = valid[:, None] + torch.arange(k, device=valid.device)
    conv_state.copy_(columns.gather(-1, index[:, None].expand_as(conv_state)))


class Mamba2Mixer(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        *,
        d_state: int = 128,
        head_dim: int = 64,
        num_groups: int = 8,
        expand: int = 2,
        d_conv: int = 4,
        chunk_size: int = 128,
        norm_eps: float = 1e-5,
        ssd: SSDFunction = ssd_chunked,
        fused: bool = False,
        conv_backend: str = "causal_conv1d",
        recompute: bool = True,
    ) -> None:
        """`fused`: train through one fused op on CUDA (same parameters and math): mamba-ssm's,
        or ours (fused_mamba.py: mamba-ssm's SSD and norm kernels) with `conv_backend` 'triton'
        (our causal conv) or without `recompute` (the conv's output and the SSD's states kept
        from the forward for the backward)."""
        super().__init__()
        self.d_inner = expand * hidden_size
        if self.d_inner % head_dim:
            raise ValueError(f"mamba: d_inner {self.d_inner} not divisible by head_dim {head_dim}")
        self.num_heads = self.d_inner // head_dim
        if self.num_heads % num_groups:
            raise ValueError(f"mamba: {self.num_heads} heads not divisible by {num_groups} groups")
        self.head_dim, self.d_state, self.num_groups = head_dim, d_state, num_groups
        self.d_conv, self.chunk_size, self.ssd, self.fused = d_conv, chunk_size, ssd, fused
        self.conv_backend, self.recompute = conv_backend, recompute
        self.conv_dim = self.d_inner + 2 * num_groups * d_state
        self.split_sizes = [self.d_inner, self.conv_dim, self.num_heads]  # z, xBC, dt

        self.in_proj = nn.Linear(hidden_size, sum(self.split_sizes), bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim)
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, num_groups, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=False)
        self._decode_A: tuple[tuple[int, int], torch.Tensor] | None = None  # see decode_A
        for p in (self.A_log, self.D, self.dt_bias):
            p._no_weight_decay = True  # read by the optimizer's parameter grouping
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        self.D.fill_(1.0)
        log_dt = torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min))
        dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def allocate_state(
        self,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        ssm_dtype: torch.dtype = torch.float32,
    ) -> MambaState:
        """`ssm_dtype`: the recurrent state's; fp32 by default (bf16 halves what a decode step
        reads and writes per sequence, as mamba-ssm's generation does, at some precision)."""
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(
            batch_size,
            self.num_heads,
            self.head_dim,
            self.d_state,
            device=device,
            dtype=ssm_dtype,
        )
        return MambaState(conv, ssm)

    def forward(self, u: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        valid = None if state is None else state.valid
        if state is not None and state.seen > 0 and u.size(1) == 1 and valid is None:
            return self.step(u, state)
        if state is None and self.fused and u.is_cuda:
            return self._forward_fused(u)
        # A prefill (with states) takes the GPU kernels the model chose; training keeps autograd
        # through the torch code or the fused op above.
        kernels = PrefillKernels() if state is None else prefill_kernels(self, u)
        length = u.size(1)
        z, xbc, dt = self.in_proj(u).split(self.split_sizes, dim=-1)
        continuing = state is not None and state.seen > 0
        conv_state = None if state is None else state.conv
        weight = self.conv1d.weight.squeeze(1)  # [conv_dim, d_conv]
        xbc = causal_conv(
            xbc, weight, self.conv1d.bias, conv_state, continuing, kernels.conv, valid
        )
        x, B, C = split_xbc(xbc, self.d_inner, self.head_dim, self.num_groups)

        # With states, A is kept between calls (decode_A): 2 fewer kernels per layer and piece.
        A = -torch.exp(self.A_log.float()) if state is None else self.decode_A()
        initial = state.ssm if continuing else None
        if kernels.scan is not None and kernels.gated_norm is not None:
            y = self._scan_norm_kernels(kernels, x, dt, A, B, C, z, initial, state, valid)
        else:
            dt = self._dt(dt, valid)
            y, final_state = self.ssd(x, dt, A, B, C, self.chunk_size, initial)
            if state is not None:
                state.ssm.copy_(final_state)
            y = y + x * self.D.to(x.dtype)[:, None]
            y = self.norm(y.flatten(-2), z)
        if state is not None:
            state.seen += length
        return self.out_proj(y)

    def _dt(self, dt: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """softplus(dt + dt_bias) in fp32; with `valid` (each row's real positions), zero on the
        padding after them: decay exp(0) = 1 and no input, so the state stays as it was (as
        ssd.py pads)."""
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if valid is None:
            return dt
        return dt * (torch.arange(dt.size(1), device=dt.device) < valid[:, None])[..., None]

    def _scan_norm_kernels(
        self,
        kernels: PrefillKernels,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        z: torch.Tensor,
        initial: torch.Tensor | None,
        state: MambaState,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The reference's SSD, D skip, softplus(dt + dt_bias) and gated norm as two mamba-ssm
        kernels (~15 eager passes over [b, l, d_inner] otherwise, in fp32). x, B, C and dt are
        strided views (of the conv output and of in_proj's), which the kernels read in place.
        With `valid` (padded rows), dt is taken through softplus here and zeroed on the padding
        (decay 1, no input: the state stays as it was), as the torch code does."""
        dt_bias, softplus = self.dt_bias, True  # pre-softplus, as in_proj wrote it
        if valid is not None:
            dt, dt_bias, softplus = self._dt(dt, valid), None, False
        y, final_state = kernels.scan(
            x,
            dt,
            A,
            B,
            C,
            self.chunk_size,
            D=self.D,
            dt_bias=dt_bias,
            initial_states=initial,
            dt_softplus=softplus,
            return_final_states=True,
        )
        state.ssm.copy_(final_state)
        return kernels.gated_norm(
            y.flatten(-2),
            self.norm.weight,
            None,
            z=z,
            eps=self.norm.eps,
            group_size=self.d_inner // self.norm.groups,
            norm_before_gate=False,  # rmsnorm(y * silu(z)), as GatedRMSNorm
        )

    def _forward_fused(self, u: torch.Tensor) -> torch.Tensor:
        """forward() without a state through one mamba-ssm op: conv + SiLU, SSD with D and the
        softplus of dt + dt_bias, and the group-wise gated RMSNorm (norm after the gate), fused.
        out_proj stays a module call so that tensor-parallel hooks and autocast apply to it."""
        zxbcdt, A = self.in_proj(u), -torch.exp(self.A_log.float())
        weight, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        if self.conv_backend == "triton" or not self.recompute:  # ours (fused_mamba.py)
            y = conv_scan_norm(zxbcdt, weight, bias, self.dt_bias, A, self.D, self.norm.weight,
                               self.chunk_size, self.head_dim, self.num_groups, self.norm.eps,
                               self.conv_backend, self.recompute)  # fmt: skip
            return self.out_proj(y)
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

        y = mamba_split_conv1d_scan_combined(
            zxbcdt,
            weight,
            bias,
            self.dt_bias,
            A,
            self.D,
            self.chunk_size,
            rmsnorm_weight=self.norm.weight,
            rmsnorm_eps=self.norm.eps,
            headdim=self.head_dim,
            ngroups=self.num_groups,  # B and C groups; the norm groups are the same
            norm_before_gate=False,
        )
        return self.out_proj(y)

    def step(self, u: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token [b, 1, hidden] -> [b, 1, hidden], updating `state` in place. Takes
        mamba-ssm's Triton state update and causal-conv1d's conv update on CUDA when the model
        chose mamba-ssm kernels (see decode_kernels); the torch code below is the reference."""
        ssm_update, conv_update, norm_kernel = decode_kernels(self, u)
        z, xbc, dt = self.in_proj(u.squeeze(1)).split(self.split_sizes, dim=-1)
        weight = self.conv1d.weight.squeeze(1)  # [conv_dim, d_conv]
        # causal-conv1d's update wants one dtype throughout and a width of 2 to 4.
        same_dtype = state.conv.dtype == xbc.dtype == weight.dtype
        if conv_update is not None and same_dtype and 2 <= self.d_conv <= 4:
            xbc = conv_update(xbc.contiguous(), state.conv, weight, self.conv1d.bias, "silu")
        else:
            state.conv.copy_(
                torch.cat([state.conv[..., 1:], xbc.unsqueeze(-1).to(state.conv.dtype)], -1)
            )
            xbc = F.silu((state.conv.to(weight.dtype) * weight).sum(-1) + self.conv1d.bias)
        x, B, C = split_xbc(xbc, self.d_inner, self.head_dim, self.num_groups)
        if ssm_update is not None:
            y = self._ssm_step_kernel(ssm_update, x, dt, B, C, state.ssm)
        else:
            y = self._ssm_step_torch(x, dt, B, C, state.ssm)
        state.seen += 1
        y = gated_norm(self.norm, y.flatten(-2), z, norm_kernel)
        return self.out_proj(y).unsqueeze(1)

    def decode_A(self) -> torch.Tensor:
        """A = -exp(A_log) in fp32 for decode steps and prefills, kept between calls (3 kernels
        per layer and call otherwise) and recomputed when A_log changes (in place: its version
        counter moves; moved: its address). With gradients on it is not kept: it would hold the graph."""
        if torch.is_grad_enabled():
            return -torch.exp(self.A_log.float())
        key = (self.A_log._version, self.A_log.data_ptr())
        if self._decode_A is None or self._decode_A[0] != key:
            self._decode_A = (key, -torch.exp(self.A_log.float()))
        return self._decode_A[1]

    def _ssm_step_torch(
        self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, ssm: torch.Tensor
    ) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [b, h]
        y = ssd_step(x, dt, self.decode_A(), B, C, ssm)
        return y + x * self.D.to(x.dtype)[:, None]

    def _ssm_step_kernel(
        self,
        ssm_update: Callable[..., torch.Tensor],
        x: torch.Tensor,
        dt: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        ssm: torch.Tensor,
    ) -> torch.Tensor:
        """selective_state_update's layout: per-(head, channel) dt, dt_bias, A and D. Broadcast
        views (stride 0) let the kernel take its tied-head-dim path; softplus(dt + dt_bias) and
        the D skip happen inside; z=None: our group-wise gated norm runs after."""
        h, p, n = self.num_heads, self.head_dim, self.d_state
        return ssm_update(
            ssm,  # [b, h, p, n], fp32 (or bf16), updated in place
            x,  # [b, h, p]
            dt.unsqueeze(-1).expand(-1, h, p),  # pre-softplus
            self.decode_A()[:, None, None].expand(h, p, n),
            B,  # [b, g, n]
            C,
            D=self.D[:, None].expand(h, p),
            z=None,
            dt_bias=self.dt_bias[:, None].expand(h, p),
            dt_softplus=True,
        )
