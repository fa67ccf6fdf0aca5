"""Grouped-query self-attention (no position embedding in hybrids, partial RoPE for the GPT baseline).

`linear_qkv` rows use Megatron's grouped layout: for each KV group g, the q rows of its
heads/groups query heads, then k_g, then v_g. A tensor-parallel rank therefore owns a contiguous
block of whole groups, and Megatron checkpoints map onto it without reordering.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.model import flash_decoding


@dataclass
class KVCache:
    """Preallocated keys and values of one attention layer; `length` positions are filled."""

    k: torch.Tensor  # [b, groups, max_len, head_dim]
    v: torch.Tensor
    length: int = 0
    # Per-row filled positions [b] when rows hold sequences of different lengths (continuous
    # batching); replaces `length` and is rebound, not changed in place, as tokens are added.
    lengths: torch.Tensor | None = None
    # Static-shape decode (CUDA graphs): one token per row, attention over the first `span`
    # positions masked per row; `lengths` is only read (the caller advances it in place).
    span: int | None = None
    # Scratch shared by the views one DecodeStates.rows/decode_rows call made, i.e. by every
    # attention layer of one forward: the mask they would each build alike is built by the first.
    shared: dict | None = None

    # The methods every decode state has (toolkit/model/states.py).
    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def rows(
        self,
        n: int,
        seen: int = 0,
        valid: torch.Tensor | None = None,
        shared: dict | None = None,
    ) -> "KVCache":
        """The first n rows (a view, no copy), `seen` positions filled. `valid` (a prefill
        piece's real positions per row) needs nothing here: keys of padding land past a row's
        prompt, where its decode writes before any query reaches them."""
        return KVCache(self.k[:n], self.v[:n], length=seen, shared=shared)

    def decode_rows(
        self,
        n: int,
        positions: torch.Tensor,
        span: int | None = None,
        shared: dict | None = None,
    ) -> "KVCache":
        """The first n rows for one token each, row r at positions[r]. With `shared`, every view
        of one call holds the same `lengths` tensor: the ragged mask's cache is keyed on it."""
        lengths = positions[:n]
        if shared is not None and span is None:
            lengths = shared.setdefault("lengths", lengths)
        return KVCache(self.k[:n], self.v[:n], lengths=lengths, span=span, shared=shared)

    def copy_row(self, row: int, source: "KVCache", source_row: int, length: int) -> None:
        self.k[row, :, :length].copy_(source.k[source_row, :, :length])
        self.v[row, :, :length].copy_(source.v[source_row, :, :length])

    def copy_rows(
        self, rows: torch.Tensor, source: "KVCache", source_rows: torch.Tensor, length: int
    ) -> None:
        self.k[rows, :, :length] = source.k[source_rows, :, :length].to(self.k.dtype)
        self.v[rows, :, :length] = source.v[source_rows, :, :length].to(self.v.dtype)


class Rotary(nn.Module):
    """Rotary embedding of the first `rotary_percent` of each head's channels (half-split form)."""

    def __init__(self, head_dim: int, rotary_percent: float = 1.0, base: float = 10000.0) -> None:
        super().__init__()
        self.rot_dim = int(head_dim * rotary_percent)
        if self.rot_dim % 2:
            raise ValueError(
                f"rotary: {self.rot_dim} rotated channels is odd (head_dim {head_dim})"
            )
        inv_freq = 1.0 / base ** (
            torch.arange(0, self.rot_dim, 2, dtype=torch.float32) / self.rot_dim
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, t: torch.Tensor, offset: int | torch.Tensor) -> torch.Tensor:
        """t [b, l, heads, head_dim] at positions offset .. offset+l-1; offset is an int or a
        per-row tensor [b, 1]."""
        pos = torch.arange(t.size(1), device=t.device, dtype=torch.float32) + offset  # [b,] l
        freqs = pos.unsqueeze(-1) * self.inv_freq.to(t.device)  # [b,] l, rot/2
        cos, sin = freqs.cos().unsqueeze(-2), freqs.sin().unsqueeze(-2)
        rot, rest = t[..., : self.rot_dim].float(), t[..., self.rot_dim :]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated.to(t.dtype), rest], dim=-1)


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int,
        num_groups: int,
        head_dim: int | None = None,
        rotary: Rotary | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_groups:
            raise ValueError(f"attention: {num_heads} heads not divisible by {num_groups} groups")
        self.num_heads, self.num_groups = num_heads, num_groups
        self.head_dim = head_dim or hidden_size // num_heads
        self.heads_per_group = num_heads // num_groups
        qkv_rows = (num_heads + 2 * num_groups) * self.head_dim
        self.linear_qkv = nn.Linear(hidden_size, qkv_rows, bias=False)
        self.linear_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.rotary = rotary

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (batch_size, self.num_groups, max_len, self.head_dim)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> torch.Tensor:
        b, length, _ = x.shape
        qkv = self.linear_qkv(x).view(
            b, length, self.num_groups, self.heads_per_group + 2, self.head_dim
        )
        q = qkv[:, :, :, :-2].flatten(2, 3)  # b l heads d
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # b l groups d
        ragged = state is not None and state.lengths is not None
        offset = 0 if state is None else state.lengths[:, None] if ragged else state.length
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if ragged and state.span is not None:
            return self.linear_proj(self._attend_static(q, k, v, state).flatten(1).unsqueeze(1))
        if ragged:
            return self.linear_proj(self._attend_ragged(q, k, v, state).transpose(1, 2).flatten(2))

        mask, causal = None, True
        if state is not None:
            end = offset + length
            if end > state.k.size(2):
                raise RuntimeError(f"KV cache holds {state.k.size(2)} positions, {end} needed")
            state.k[:, :, offset:end] = k
            state.v[:, :, offset:end] = v
            state.length = end
            k, v = state.k[:, :, :end], state.v[:, :, :end]
            if offset > 0:
                # SDPA's is_causal aligns the mask top-left: with cached keys, query i must see
                # keys up to offset + i, so the alignment is bottom-right (q_len 1: no mask).
                causal = False
                if length > 1:
                    mask = causal_after_cache(q, offset, end, state.shared)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.num_groups != self.num_heads
        )
        return self.linear_proj(out.transpose(1, 2).flatten(2))

    def _attend_ragged(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: KVCache
    ) -> torch.Tensor:
        """Rows continue from their own cache lengths: write each row's keys at its positions and
        let query i of row r see keys up to lengths[r] + i."""
        piece = ragged_piece(state.lengths, k.size(2), state.shared)
        end = piece.end
        if end > state.k.size(2):
            raise RuntimeError(f"KV cache holds {state.k.size(2)} positions, {end} needed")
        state.k[piece.rows, :, piece.pos] = k.transpose(1, 2)  # indexed as [b, l, groups, d]
        state.v[piece.rows, :, piece.pos] = v.transpose(1, 2)
        state.lengths = piece.after
        return F.scaled_dot_product_attention(
            q,
            state.k[:, :, :end],
            state.v[:, :, :end],
            attn_mask=piece.mask,
            enable_gqa=self.num_groups != self.num_heads,
        )

    def _attend_static(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: KVCache
    ) -> torch.Tensor:
        """One query per row at position lengths[r], keys over a fixed `span` of the cache: the
        shapes do not depend on the lengths, and nothing here reads a value on the host, so a
        CUDA graph can capture it. Returns [b, heads, head_dim]. Where flash_decoding takes it,
        its kernels write the new keys and attend; elsewhere decode_attention, the reference."""
        b, groups, length, d = k.shape
        span = state.span
        if length != 1 or span > state.k.size(2):
            raise RuntimeError(
                f"static decode takes one token per row within the cache ({state.k.size(2)} "
                f"positions); got {length} tokens, span {span}"
            )
        # A group's query heads become its queries: no GQA expansion of the keys.
        q = q.reshape(b, groups, self.heads_per_group, d)
        if flash_decoding.takes(q, state.k):  # the keys split over the GPU, in 2 kernels
            cache = state.k[:, :, :span], state.v[:, :, :span]
            out = flash_decoding.attend(q, k[:, :, 0], v[:, :, 0], *cache, state.lengths)
            return out.reshape(b, self.num_heads, d)
        pos = state.lengths[:, None]  # b 1
        rows = torch.arange(b, device=k.device)[:, None]
        state.k[rows, :, pos] = k.transpose(1, 2)  # indexed as [b, 1, groups, d]
        state.v[rows, :, pos] = v.transpose(1, 2)
        mask = pos[:, :, None, None] >= torch.arange(span, device=k.device)  # b 1 1 span
        out = decode_attention(q, state.k[:, :, :span], state.v[:, :, :span], mask)
        return out.reshape(b, self.num_heads, d)


def lower_right_bias(query: torch.Tensor) -> bool:
    """Whether queries after cached keys take SDPA's lower-right causal bias instead of an
    explicit mask: on CUDA in half precision, where flash attention runs it with no mask in
    memory (cuDNN with a materialised mask took 130 of the 8B's 32k prefill's 930 ms). Elsewhere
    the bias would be materialised on every call anyway (the CPU's math backend; fp32 CUDA with
    grouped heads, which the efficient kernel does not take), so the explicit mask, built once
    per forward, is the cheaper."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def causal_after_cache(
    q: torch.Tensor, offset: int, end: int, shared: dict | None = None
) -> torch.Tensor:
    """The attn_mask for queries at positions offset..end-1 (every row alike) over keys 0..end-1:
    query i sees keys up to offset + i (bottom-right aligned). SDPA's lower-right causal bias where
    lower_right_bias(q) says so; otherwise a boolean [l, end] mask, kept in `shared` (one
    forward's scratch, see KVCache.shared) under its ints, so the layers after the first reuse
    it and nothing else can."""
    length = end - offset
    if lower_right_bias(q):
        # Imported here: torch.nn.attention.bias imports torch._dynamo, 1.7 s at every start of
        # a process that never takes this branch (every CPU one).
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(length, end)
    key = (offset, end, q.device)
    hit = None if shared is None else shared.get("causal")
    if hit is not None and hit[0] == key:
        return hit[1]
    q_pos = torch.arange(offset, end, device=q.device)[:, None]
    mask = q_pos >= torch.arange(end, device=q.device)[None, :]
    if shared is not None:
        shared["causal"] = (key, mask)
    return mask


@dataclass
class RaggedPiece:
    """Where one piece of l tokens per row goes when rows continue from their own lengths."""

    lengths: torch.Tensor  # [b] before the piece: the key it was built for (held, so `is` holds)
    length: int
    rows: torch.Tensor  # [b, 1]
    pos: torch.Tensor  # [b, l] the queries' positions
    end: int  # keys 0..end-1 are read
    mask: torch.Tensor  # [b, 1, l, end] query i of row r sees keys up to lengths[r] + i
    after: torch.Tensor  # [b] lengths after the piece


def ragged_piece(lengths: torch.Tensor, length: int, shared: dict | None = None) -> RaggedPiece:
    """The positions and mask of a piece after per-row `lengths`. Every attention layer of one
    forward continues from the same lengths: with `shared` (one DecodeStates call's scratch,
    whose views hold the same lengths tensor) the first layer builds them (and reads `end` on
    the host, a sync) and the others reuse them, advancing to the same `after` tensor, so the
    next forward of the same views hits as well. The key is the lengths tensor itself (`is`,
    not its values: reading those would sync), which the views rebind rather than change."""
    hit = None if shared is None else shared.get("ragged")
    if hit is not None and hit.lengths is lengths and hit.length == length:
        return hit
    device = lengths.device
    pos = lengths[:, None] + torch.arange(length, device=device)  # b l
    end = int(pos.max()) + 1
    piece = RaggedPiece(
        lengths=lengths,
        length=length,
        rows=torch.arange(lengths.size(0), device=device)[:, None],
        pos=pos,
        end=end,
        mask=pos[:, None, :, None] >= torch.arange(end, device=device),
        after=lengths + length,
    )
    if shared is not None:
        shared["ragged"] = piece
    return piece


# (row, group) pairs from which decode_attention uses SDPA (benchmarks/decode_profile.py).
MATMUL_ATTENTION_BELOW = 32


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) v for a few queries per (row, group) over a long cache:
    q [b, g, n, d], k and v [b, g, span, d], mask [b, 1, 1, span] (True: attend).

    SDPA's kernels parallelise over (row, group, query block): with few of those (the 8B
    hybrid at batch 1: 8 groups) most of the GPU idles while a handful of blocks walk 32k keys
    (0.64 ms per layer on the H200). Then two batched matmuls, which spread the keys over the
    whole GPU (94 us); with many (row, group) pairs SDPA is the faster one. Softmax in fp32."""
    if q.size(0) * q.size(1) >= MATMUL_ATTENTION_BELOW:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * q.size(-1) ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)
