"""Mamba-2 mixer with a pure-PyTorch chunked SSD (the reference kernel) and a one-token decode step.

Shapes: batch b, length l, heads h, head dim p, groups g, state n. in_proj rows are ordered
[z, x, B, C, dt] (DESIGN.md section 2); head h reads B and C of group h // (heads / groups).
"""

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.model.norms import GatedRMSNorm

log = logging.getLogger("toolkit.model.mamba2")

# ssd(x, dt, A, B, C, chunk_size, initial_state) -> (y, final_state); see ssd_chunked.
SSDFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum(x[..., j+1 : i+1]) for j <= i, -inf above the diagonal.

    Built from a masked cumulative sum rather than a difference of cumsums, which cancels badly.
    """
    t = x.size(-1)
    x = x.unsqueeze(-1).expand(*x.shape, t)  # [..., i, j] = x[i]
    strictly_lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), -1)
    x = x.masked_fill(~strictly_lower, 0.0)
    sums = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
    return sums.masked_fill(~lower, -torch.inf)


def _heads_from_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, l, g, n] -> [b, l, h, n]: each group serves heads/g consecutive heads."""
    return t.repeat_interleave(heads // t.size(2), dim=2)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked state-space duality scan, fp32 inside.

    x [b,l,h,p], dt [b,l,h] (after softplus), A [h] (negative), B and C [b,l,g,n],
    initial_state [b,h,p,n]. Returns y [b,l,h,p] (without the D skip) in x's dtype and the
    final state [b,h,p,n] in fp32. Equals the recurrence h_t = exp(dt A) h_{t-1} + dt B_t x_t,
    y_t = C_t h_t.
    """
    b, length, heads, p = x.shape
    pad = (-length) % chunk_size
    # Zero dt on padded steps: decay exp(0) = 1 and no input, so the final state is unchanged.
    xf, dtf = F.pad(x.float(), (0, 0, 0, 0, 0, pad)), F.pad(dt.float(), (0, 0, 0, pad))
    Bf = F.pad(_heads_from_groups(B.float(), heads), (0, 0, 0, 0, 0, pad))
    Cf = F.pad(_heads_from_groups(C.float(), heads), (0, 0, 0, 0, 0, pad))
    c = (length + pad) // chunk_size

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [b, c*k, ...] -> [b, c, k, ...]
        return t.unflatten(1, (c, chunk_size))

    xdt = chunks(xf * dtf.unsqueeze(-1))  # b c k h p
    Bc, Cc = chunks(Bf), chunks(Cf)  # b c k h n
    a = chunks(dtf * A.float()).permute(0, 3, 1, 2)  # b h c k
    a_cumsum = torch.cumsum(a, dim=-1)

    # 1. Outputs from inputs within the same chunk (the quadratic, attention-like part).
    decay = torch.exp(segment_sum(a))  # b h c k k
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay, xdt)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # b h c k
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xdt)

    # 3. Carry states across chunks: state entering chunk i, plus the final state.
    if initial_state is None:
        initial_state = xf.new_zeros(b, heads, p, Bf.size(-1))
    states = torch.cat([initial_state.float().unsqueeze(1), chunk_states], dim=1)
    chunk_decay = torch.exp(segment_sum(F.pad(a_cumsum[..., -1], (1, 0))))  # b h c+1 c+1
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. Outputs from the state entering each chunk.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, entering, torch.exp(a_cumsum))
    y = (y_diag + y_off).flatten(1, 2)[:, :length]
    return y.to(x.dtype), final_state


def ssd_recurrent(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 0,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The defining recurrence, one step at a time (slow; the ground truth for tests)."""
    b, length, heads, p = x.shape
    Bh, Ch = _heads_from_groups(B, heads), _heads_from_groups(C, heads)
    state = x.new_zeros(b, heads, p, B.size(-1)) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1), state


def ssd_mamba_ssm(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same contract as ssd_chunked, through mamba-ssm's Triton chunked scan on CUDA tensors
    (same group-to-head mapping); CPU tensors take the reference."""
    if not x.is_cuda:
        return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    y, final_state = mamba_chunk_scan_combined(
        x.contiguous(),
        dt.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        chunk_size,
        initial_states=None if initial_state is None else initial_state.contiguous(),
        return_final_states=True,
    )
    return y.to(x.dtype), final_state.float()


def _import_error(*modules: str) -> str | None:
    """Why importing `modules` fails here ("ModuleNotFoundError: No module named 'einops'"), or
    None when they import."""
    try:
        for module in modules:
            __import__(module)
    except Exception as e:  # ImportError, a missing compiled extension, one built for another GPU
        return f"{type(e).__name__}: {e}"
    return None


_WARNED: set[str] = set()


def _warn_fallback(what: str, error: str) -> None:
    """Once per process: 'auto' took the slow path on a GPU because a kernel package is broken
    (a silent fallback costs several times the step time and nobody notices)."""
    if what not in _WARNED:
        _WARNED.add(what)
        log.warning(
            "model.kernels='auto' on a GPU: %s, because it does not import (%s). Install it and "
            "what it imports (mamba-ssm needs einops and transformers), or use the image from "
            "containers/",
            what,
            error,
        )


def mamba_ssm_available(kernels: str = "") -> bool:
    """Whether mamba-ssm's Triton SSD can run here (the package imports and CUDA is present).
    With kernels='auto', a GPU without it is worth a warning."""
    if not torch.cuda.is_available():
        return False
    error = _import_error("mamba_ssm.ops.triton.ssd_combined")
    if error and kernels == "auto":
        _warn_fallback("the reference SSD kernels run instead of mamba-ssm's (mamba_ssm)", error)
    return error is None


def fused_mamba_available(kernels: str = "") -> bool:
    """Whether mamba-ssm's fused training op (causal conv, SSD and gated norm in one autograd
    function) can run here: mamba-ssm's Triton kernels plus the causal-conv1d extension."""
    if not mamba_ssm_available(kernels):
        return False
    error = _import_error("causal_conv1d", "mamba_ssm.ops.triton.ssd_combined")
    if error and kernels == "auto":
        _warn_fallback("the fused Mamba training op is off (causal_conv1d)", error)
    return error is None


def use_fused_mamba(kernels: str) -> bool:
    """`model.kernels` 'auto' and 'mamba_ssm' take the fused op when it is available."""
    return kernels in ("auto", "mamba_ssm") and fused_mamba_available(kernels)


SSD_KERNELS: dict[str, SSDFunction] = {"reference": ssd_chunked, "mamba_ssm": ssd_mamba_ssm}


def select_ssd(kernels: str) -> SSDFunction:
    """The SSD implementation for `model.kernels`; 'auto' picks the fastest one available."""
    if kernels == "auto":
        return SSD_KERNELS["mamba_ssm" if mamba_ssm_available("auto") else "reference"]
    if kernels not in SSD_KERNELS:
        raise ValueError(f"model.kernels={kernels!r} is not one of {sorted(SSD_KERNELS)}")
    if kernels == "mamba_ssm" and not mamba_ssm_available():
        raise ValueError(
            "model.kernels='mamba_ssm' needs CUDA and the mamba-ssm package (pip install "
            "mamba-ssm, or the image from containers/); use 'auto' to fall back to 'reference'"
        )
    return SSD_KERNELS[kernels]


@dataclass
class MambaState:
    """Decode state of one Mamba layer: the last d_conv pre-conv columns and the SSM state."""

    conv: torch.Tensor  # [b, conv_dim, d_conv]
    ssm: torch.Tensor  # [b, heads, head_dim, d_state], fp32 (or bf16 if asked for decode)
    seen: int = 0  # tokens consumed so far


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
    ) -> None:
        """`fused`: train through mamba-ssm's fused op on CUDA (same parameters and math)."""
        super().__init__()
        self.d_inner = expand * hidden_size
        if self.d_inner % head_dim:
            raise ValueError(f"mamba: d_inner {self.d_inner} not divisible by head_dim {head_dim}")
        self.num_heads = self.d_inner // head_dim
        if self.num_heads % num_groups:
            raise ValueError(f"mamba: {self.num_heads} heads not divisible by {num_groups} groups")
        self.head_dim, self.d_state, self.num_groups = head_dim, d_state, num_groups
        self.d_conv, self.chunk_size, self.ssd, self.fused = d_conv, chunk_size, ssd, fused
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

    def _split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gn = self.num_groups * self.d_state
        x, B, C = xbc.split([self.d_inner, gn, gn], dim=-1)
        return (
            x.unflatten(-1, (self.num_heads, self.head_dim)),
            B.unflatten(-1, (self.num_groups, self.d_state)),
            C.unflatten(-1, (self.num_groups, self.d_state)),
        )

    def forward(self, u: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        if state is not None and state.seen > 0 and u.size(1) == 1:
            return self.step(u, state)
        if state is None and self.fused and u.is_cuda:
            return self._forward_fused(u)
        b, length, _ = u.shape
        z, xbc, dt = self.in_proj(u).split(self.split_sizes, dim=-1)

        # Depthwise causal conv; continuing a sequence, the cached columns are the left context.
        xbc_t = xbc.transpose(1, 2)
        if state is not None and state.seen > 0:
            padded = torch.cat([state.conv[..., 1:].to(xbc_t.dtype), xbc_t], dim=-1)
        else:
            padded = F.pad(xbc_t, (self.d_conv - 1, 0))
        if state is not None:
            state.conv.copy_(padded[..., -self.d_conv :])  # padded has >= d_conv columns
        xbc = F.silu(F.conv1d(padded, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim))
        x, B, C = self._split_xbc(xbc.transpose(1, 2))

        A = -torch.exp(self.A_log.float())
        dt = F.softplus(dt.float() + self.dt_bias.float())
        initial = state.ssm if state is not None and state.seen > 0 else None
        y, final_state = self.ssd(x, dt, A, B, C, self.chunk_size, initial)
        if state is not None:
            state.ssm.copy_(final_state)
            state.seen += length
        y = y + x * self.D.to(x.dtype)[:, None]
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _forward_fused(self, u: torch.Tensor) -> torch.Tensor:
        """forward() without a state through one mamba-ssm op: conv + SiLU, SSD with D and the
        softplus of dt + dt_bias, and the group-wise gated RMSNorm (norm after the gate), fused.
        out_proj stays a module call so that tensor-parallel hooks and autocast apply to it."""
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

        y = mamba_split_conv1d_scan_combined(
            self.in_proj(u),
            self.conv1d.weight.squeeze(1),
            self.conv1d.bias,
            self.dt_bias,
            -torch.exp(self.A_log.float()),
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
        ssm_update, conv_update, gated_norm = decode_kernels(self, u)
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
        x, B, C = self._split_xbc(xbc)
        if ssm_update is not None:
            y = self._ssm_step_kernel(ssm_update, x, dt, B, C, state.ssm)
        else:
            y = self._ssm_step_torch(x, dt, B, C, state.ssm)
        state.seen += 1
        y = y.flatten(-2)
        if gated_norm is not None:  # one kernel instead of ~8 small ones per layer and token
            y = gated_norm(
                y.contiguous(),
                self.norm.weight,
                None,
                z=z.contiguous(),
                eps=self.norm.eps,
                group_size=y.size(-1) // self.norm.groups,
                norm_before_gate=False,  # rmsnorm(y * silu(z)), as GatedRMSNorm
            )
        else:
            y = self.norm(y, z)
        return self.out_proj(y).unsqueeze(1)

    def decode_A(self) -> torch.Tensor:
        """A = -exp(A_log) in fp32 for decode steps, kept between steps (3 kernels per layer and
        token otherwise) and recomputed when A_log changes (in place: its version counter moves;
        moved: its address). With gradients on it is not kept: it would hold the graph."""
        if torch.is_grad_enabled():
            return -torch.exp(self.A_log.float())
        key = (self.A_log._version, self.A_log.data_ptr())
        if self._decode_A is None or self._decode_A[0] != key:
            self._decode_A = (key, -torch.exp(self.A_log.float()))
        return self._decode_A[1]

    def _ssm_step_torch(
        self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, ssm: torch.Tensor
    ) -> torch.Tensor:
        A = self.decode_A()
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [b, h]
        heads = self.num_heads
        Bh = B.repeat_interleave(heads // self.num_groups, dim=1)  # [b, h, n]
        Ch = C.repeat_interleave(heads // self.num_groups, dim=1)
        decay = torch.exp(dt * A)[:, :, None, None]
        update = (dt.unsqueeze(-1) * x.float()).unsqueeze(-1) * Bh.float().unsqueeze(2)
        ssm.copy_(decay * ssm + update)
        y = torch.einsum("bhpn,bhn->bhp", ssm.float(), Ch.float()).to(x.dtype)
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


class DecodeKernels(NamedTuple):
    """Kernels for a decode step; None: the torch code."""

    ssm_update: Callable[..., torch.Tensor] | None = None  # mamba-ssm selective_state_update
    conv_update: Callable[..., torch.Tensor] | None = None  # causal_conv1d_update
    gated_norm: Callable[..., torch.Tensor] | None = None  # mamba-ssm rmsnorm_fn (Triton)


@functools.cache
def _import_decode_kernels() -> DecodeKernels:
    """Each kernel that imports here."""
    found: dict[str, Any] = {}
    try:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        found |= dict(ssm_update=selective_state_update, gated_norm=rmsnorm_fn)
    except Exception:  # ImportError, or its missing compiled Mamba-1 extension
        pass
    try:
        from causal_conv1d import causal_conv1d_update

        found["conv_update"] = causal_conv1d_update
    except Exception:  # ImportError, or an extension built for another GPU
        pass
    return DecodeKernels(**found)


def decode_kernels(mixer: Mamba2Mixer, u: torch.Tensor) -> DecodeKernels:
    """The kernels for a decode step. Only for CUDA input of a mixer built with mamba-ssm's SSD
    (`model.kernels` 'auto' where it is available, or 'mamba_ssm'); the conv kernel only where
    causal-conv1d imports."""
    if not u.is_cuda or mixer.ssd is not ssd_mamba_ssm:
        return DecodeKernels()
    return _import_decode_kernels()
