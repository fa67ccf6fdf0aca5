"""The reference state-space duality (SSD) of Mamba-2 in pure PyTorch: the chunked scan that
trains and prefills (`ssd_chunked`, the 'reference' of `model.kernels`), the one-token step that
decodes (`ssd_step`), and the defining recurrence they are tested against (`ssd_recurrent`).
The role of mamba-ssm's ssd_minimal.py; kernels.py binds the GPU kernels to the same contract.

Shapes: batch b, length l, heads h, head dim p, groups g, state n; head h reads B and C of
group h // (heads / groups).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

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
    # A sequence shorter than a chunk is one chunk of its own length (the same sums): a short
    # prefill piece does not pay the quadratic part over a whole chunk of padding.
    chunk_size = max(1, min(chunk_size, length))
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


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One token of the recurrence, computed in fp32; `state` [b,h,p,n] is updated in place.
    x [b,h,p], dt [b,h] (after softplus), A [h], B and C [b,g,n]. Returns y [b,h,p] (without the
    D skip) in x's dtype."""
    heads = x.size(1)
    Bh = B.repeat_interleave(heads // B.size(1), dim=1)  # [b, h, n]
    Ch = C.repeat_interleave(heads // C.size(1), dim=1)
    decay = torch.exp(dt * A)[:, :, None, None]
    update = (dt.unsqueeze(-1) * x.float()).unsqueeze(-1) * Bh.float().unsqueeze(2)
    state.copy_(decay * state + update)
    return torch.einsum("bhpn,bhn->bhp", state.float(), Ch.float()).to(x.dtype)
