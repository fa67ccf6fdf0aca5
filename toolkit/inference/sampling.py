"""Sampling one token per row when every row brings its own settings and its own random draw.

The draw is a uniform number per row, mapped through the row's filtered distribution (inverse
CDF): a request's random stream then depends only on its own seed, never on which other requests
share the batch. What a step costs depends on the settings present, known on the host:
- temperature only: the inverse CDF of the row's integer masses (below) over the vocabulary in
  its own order, no sort;
- top-k (then top-p): the best max(top_k) tokens (torch.topk), ranked as a full sort would;
- top-p without top-k: each row's nucleus threshold from histograms of its logits' bit
  patterns, 16 bits a pass (one pass for 16-bit logits over a 256k vocabulary, two for float32;
  no sort, nothing read on the host), then the same inverse CDF over the kept tokens.
On CUDA these whole-vocabulary rows run as a few Triton kernels (sampling_kernels) that compute
the same integers; elsewhere in torch.
Filtering rules: top_k, then top_p over what is left (a token is dropped when the tokens ranked
above it already cover top_p; the first always stays); temperature 0 is greedy.

The masses: the weights w = exp((logit - max) / T) (float32) are counted as integers
q = floor(w * 2**S), S = 62 - ceil(log2(vocab)), so that a row's sums are exact whatever their
order (a weight below 2**-S, some 1e-13 of the row's top, is never drawn). The draw u in [0, 1)
picks the first token whose running mass exceeds floor(u * Q), Q the row's total.

Top-p without top-k, exactly (_outside): M(v), the mass of the tokens whose
logit is >= v; Z = M(-inf). The threshold t is the largest logit of the row with
float64(M(t)) >= float64(top_p) * float64(Z), and the row keeps every token whose logit is >= t:
the sort-based nucleus (the smallest top set reaching top_p), with every token tied with its last
token kept too (a sort orders equal logits arbitrarily; +0 and -0 are equal).
"""

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from toolkit.inference.request import Request
from toolkit.model.kernels import triton_runs_on


@dataclass(frozen=True, eq=False)
class Rows:
    """A batch's per-row sampling settings on the device, and what the host knows of them, so
    that a step reads nothing back to choose its path. Built when the batch's requests change
    (RowsCache), reused while they stay."""

    temperature: torch.Tensor  # [b] float32, 0: greedy
    inverse: torch.Tensor  # [b] float32, 1 / temperature (1 for greedy rows)
    top_k: torch.Tensor  # [b] long, 0: off (also for top_k >= vocab)
    top_p: torch.Tensor  # [b] float32, 0: off (also for top_p >= 1)
    plain: torch.Tensor  # [b] bool: sampled without top-k or top-p
    filtered: torch.Tensor  # [b] bool: sampled with top-k or top-p
    nucleus_only: torch.Tensor  # [b] bool: top-p without top-k
    sampled: bool  # some row has a temperature
    any_plain: bool
    max_k: int  # the largest top_k of a filtered row (0: none)
    any_nucleus_only: bool
    natural: torch.Tensor  # [b] bool: drawn over the vocabulary's order (plain or nucleus_only)
    shares: torch.Tensor  # [b] bool: the sampling pass gives the row's logprobs (see pick)
    shares_host: tuple[bool, ...]  # the same, on the host

    @staticmethod
    def build(
        temperature: Sequence[float],
        top_k: Sequence[int],
        top_p: Sequence[float],
        vocab: int,
        device: torch.device,
    ) -> "Rows":
        ks = [k if 0 < k < vocab else 0 for k in top_k]
        ps = [p if 0 < p < 1 else 0.0 for p in top_p]
        sampled = [t > 0 for t in temperature]
        filtered = [s and (k > 0 or p > 0) for s, k, p in zip(sampled, ks, ps)]
        nucleus_only = [f and k == 0 for f, k in zip(filtered, ks)]
        # Sampled at temperature 1 without top-k or top-p: the pass over the whole vocabulary
        # sums exp(logits - max), the softmax's normaliser.
        shares = [t == 1 and k == 0 and p == 0 for t, k, p in zip(temperature, ks, ps)]
        columns = [
            list(temperature),
            [1 / t if t > 0 else 1.0 for t in temperature],
            ks,  # exact in float32 below 2**24
            ps,
            [s and not f for s, f in zip(sampled, filtered)],
            filtered,
            nucleus_only,
            shares,
            [s and k == 0 for s, k in zip(sampled, ks)],
        ]
        # One copy to the device for every column; from pinned memory, without waiting.
        host = torch.tensor(columns, dtype=torch.float32, pin_memory=device.type == "cuda")
        dev = host.to(device, non_blocking=True)
        return Rows(
            temperature=dev[0],
            inverse=dev[1],
            top_k=dev[2].long(),
            top_p=dev[3],
            plain=dev[4].bool(),
            filtered=dev[5].bool(),
            nucleus_only=dev[6].bool(),
            sampled=any(sampled),
            any_plain=any(columns[4]),
            max_k=max((k for f, k in zip(filtered, ks) if f), default=0),
            any_nucleus_only=any(nucleus_only),
            natural=dev[8].bool(),
            shares=dev[7].bool(),
            shares_host=tuple(shares),
        )


class RowsCache:
    """The last batch's Rows, kept while the same requests run in the same rows."""

    def __init__(self) -> None:
        self.requests: tuple[Request, ...] = ()
        self.vocab = 0
        self.rows: Rows | None = None

    def get(self, requests: Sequence[Request], vocab: int, device: torch.device) -> Rows:
        same = len(requests) == len(self.requests) and all(
            a is b for a, b in zip(requests, self.requests)
        )
        if not same or self.rows is None or vocab != self.vocab:
            self.requests, self.vocab = tuple(requests), vocab
            self.rows = Rows.build(
                [r.temperature for r in requests],
                [r.top_k for r in requests],
                [r.top_p for r in requests],
                vocab,
                device,
            )
        return self.rows


def sample(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    any_sampled: bool | None = None,
) -> torch.Tensor:
    """logits [b, v] -> token ids [b]. Per row: temperature 0 is greedy, top_k 0 and top_p 0 (or
    >= 1) are off, `uniform` in [0, 1) is the row's random draw. Reads the settings on the host
    (which waits for the device) unless `any_sampled` is False."""
    if any_sampled is False:
        return logits.argmax(-1)
    rows = Rows.build(
        temperature.tolist(), top_k.tolist(), top_p.tolist(), logits.size(-1), logits.device
    )
    return draw(logits, rows, uniform.float())[0]


def draw(
    logits: torch.Tensor, rows: Rows, uniform: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Token ids [b] for `rows`' settings and draws (float32); also, when a row samples, each
    row's largest logit [b] and, when computed (else None), the sums of the weights each row
    draws from [b] (defined in the rows without top-k): for a row without top-k or top-p,
    exp((logits - largest) / temperature) over the whole vocabulary. A row's token depends on its own logits, settings and draw only;
    nothing is read on the host."""
    if not rows.sampled:
        return logits.argmax(-1), None, None
    best, tokens = logits.max(-1)  # the greedy tokens, and each row's top for a stable exp
    best = best.float()
    total = None
    if rows.any_plain or rows.any_nucleus_only:
        natural, total = _natural(logits, best, rows, uniform)
        tokens = torch.where(rows.natural, natural, tokens)
    if rows.max_k:
        c, vocab = rows.max_k, logits.size(-1)
        c = vocab if c > vocab // 2 else c  # a partial selection would cost a sort
        ranked = _ranked(logits.float(), best, rows, uniform, c)
        tokens = torch.where(rows.filtered & ~rows.nucleus_only, ranked, tokens)
    return tokens, best, total


def _weights(x: torch.Tensor, best: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """exp((x - best) / T) per row: the row's top maps to 1, nothing overflows. Every op acts on
    each element alone: the same bits in any batch."""
    return (x - best[:, None]).mul_(inverse[:, None]).exp_()


def _natural(
    logits: torch.Tensor, best: torch.Tensor, rows: Rows, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws of the rows without top-k (`rows.natural`): the inverse CDF of the rows' exact
    integer masses (the module's docstring), top-p's nucleus applied, over the vocabulary in its
    own order (the same distribution as over a ranking, and no sort); also each row's sum of the
    weights. Triton kernels where they run (sampling_kernels), else torch: the same integers."""
    vocab = logits.size(-1)
    scale = _mass_scale(vocab)
    kernels = _kernels(logits)
    if kernels is None:
        mass = _weights(logits.float(), best, rows.inverse).mul_(scale).long()
        if rows.any_nucleus_only:
            key, width = _order_key(logits)
            outside = _outside_keys(key, width, mass, rows.top_p, rows.nucleus_only)
            mass.masked_fill_(outside, 0)
        cum = mass.cumsum(-1)  # exact: integers
        total = cum[:, -1]
        target = _target(uniform, total)
        pick = torch.searchsorted(cum, target[:, None], right=True).squeeze(-1)
        pick = pick.clamp_(max=vocab - 1)
    else:
        args = (logits.contiguous(), best.contiguous(), rows.inverse)
        width = key_width(logits)
        threshold = torch.full_like(best, -(1 << 31), dtype=torch.int32)
        if rows.any_nucleus_only:

            def histogram(low: int, digit_bits: int, prefix: torch.Tensor | None) -> torch.Tensor:
                on = rows.nucleus_only
                return kernels.histogram(*args, on, scale, width, low, digit_bits, prefix)

            threshold = _threshold(width, vocab, rows.top_p, rows.nucleus_only, histogram)
        sums = kernels.block_masses(*args, rows.natural, threshold, scale, width)
        cum = sums.cumsum(-1)
        total = cum[:, -1]
        target = _target(uniform, total)
        block = (cum <= target[:, None]).sum(-1)  # the first block whose mass passes the draw
        before = cum.gather(-1, (block - 1).clamp(min=0)[:, None]).squeeze(-1)
        offset = target - torch.where(block > 0, before, 0)
        pick = kernels.pick_in_block(*args, threshold, block, offset, scale, width)
    return pick, (total.double() / scale).float()


def _mass_scale(vocab: int) -> float:
    """2**S: a row's integer masses floor(w * 2**S) sum below 2**62 (each weight is at most 1)."""
    return 2.0 ** (62 - (vocab - 1).bit_length())


def _target(uniform: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """floor(u * total), below total: the draw lands on the first token whose running mass
    exceeds it, so a token of zero mass never wins (total 0, a row not drawn here: -1)."""
    target = (uniform.double() * total.double()).floor_().long()
    return torch.minimum(target, total - 1)


def _kernels(logits: torch.Tensor):  # noqa: ANN202 - the module, imported on demand
    """sampling_kernels for these logits, or None for the torch path: on CUDA when Triton
    imports; on a CPU only under Triton's interpreter (TRITON_INTERPRET=1: the tests).
    TOOLKIT_TRITON_SAMPLING=off keeps the torch path (to compare them)."""
    if os.environ.get("TOOLKIT_TRITON_SAMPLING", "auto") == "off":
        return None
    if not triton_runs_on(logits.device):
        return None
    try:
        from toolkit.inference import sampling_kernels
    except ImportError:
        return None
    return sampling_kernels


def key_width(logits: torch.Tensor) -> int:
    """The bits of the logits' order keys: 16 for 16-bit logits, else 32 (as float32)."""
    return 16 if logits.dtype in (torch.bfloat16, torch.float16) else 32


def _order_key(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each logit's bit pattern as an int32 that orders as the logits do (+0 and -0 alike), in
    [-2**(bits - 1), 2**(bits - 1)), and the bits (key_width)."""
    width = key_width(logits)
    if width == 16:
        bits = logits.view(torch.int16).int()
    else:
        bits = logits.float().view(torch.int32)
    # Sign and magnitude to two's complement: a negative float orders as minus its magnitude.
    sign = bits >> (width - 1)  # 0 or -1
    key = bits & ((1 << (width - 1)) - 1)
    return key.bitwise_xor_(sign).sub_(sign), width


def _outside(
    logits: torch.Tensor, weights: torch.Tensor, top_p: torch.Tensor, on: torch.Tensor
) -> torch.Tensor:
    """[b, v] bool: the tokens outside each row's nucleus (the module's docstring says which);
    none in the rows where `on` is False. `weights`: the rows' exp((logits - max) / T)."""
    mass = weights.mul(_mass_scale(weights.size(-1))).long()
    return _outside_keys(*_order_key(logits), mass, top_p, on)


def _outside_keys(
    key: torch.Tensor, width: int, mass: torch.Tensor, top_p: torch.Tensor, on: torch.Tensor
) -> torch.Tensor:
    """_outside from the logits' order keys (of `width` bits) and the rows' integer masses."""
    b, vocab = mass.shape

    def histogram(low: int, digit_bits: int, prefix: torch.Tensor | None) -> torch.Tensor:
        bins = 1 << digit_bits
        digit = key >> low if low else key
        if prefix is None:  # the top digit, signed: unsigned, largest logits in bin 0
            index, src = (bins // 2 - 1 - digit).long(), mass
        else:  # the next digit, within the bin found so far
            index = (bins - 1 - (digit & (bins - 1))).long()
            src = torch.where((key >> (low + digit_bits)) == prefix[:, None], mass, 0)
        hist = torch.zeros(b, bins, dtype=torch.long, device=key.device)
        return hist.scatter_add_(1, index, src)

    return key < _threshold(width, vocab, top_p, on, histogram)[:, None]


def _threshold(
    width: int,
    vocab: int,
    top_p: torch.Tensor,
    on: torch.Tensor,
    histogram: Callable[[int, int, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """[b] int32: each row's nucleus threshold key (the smallest key kept; below every key in
    the rows where `on` is False), by a radix select on the masses: `histogram(low, digit_bits,
    prefix)` gives the mass per value of the keys' digit at bit `low` (prefix None: the top
    digit, else only the keys whose higher bits equal the row's prefix found so far), summed
    here from the largest logits down until the first bin that reaches the target. Fixed
    shapes, no sort, nothing read on the host."""
    device = top_p.device
    # 16 bits a pass (one for 16-bit logits), or 8 where the bins would outnumber the tokens.
    digit_bits = 16 if vocab >= 1 << 16 else 8
    bins = 1 << digit_bits
    found = torch.zeros(top_p.size(0), dtype=torch.long, device=device)  # the key, unsigned
    above = torch.zeros_like(found)  # the mass of the logits above the bin searched
    target = None
    for low in range(width - digit_bits, -1, -digit_bits):
        prefix = None
        if target is not None:
            high = width - low - digit_bits  # the bits found so far, signed as the key's
            prefix = ((found >> (low + digit_bits)) - (1 << (high - 1))).int()
        cum = histogram(low, digit_bits, prefix).cumsum_(-1).add_(above[:, None])
        if target is None:
            target = top_p.double() * cum[:, -1].double()
        first = (cum.double() < target[:, None]).sum(-1)  # the first bin that reaches it
        found |= (bins - 1 - first) << low
        if low:
            below = cum.gather(-1, (first - 1).clamp_(min=0)[:, None]).squeeze(-1)
            above = torch.where(first > 0, below, above)
    threshold = found - (1 << (width - 1))  # signed again
    return torch.where(on, threshold, -(1 << 31)).int()  # off: below every key


def _ranked(
    x: torch.Tensor, best: torch.Tensor, rows: Rows, uniform: torch.Tensor, c: int
) -> torch.Tensor:
    """Top-k (then top-p) sampling over the rows' best `c` tokens ranked best first (the inverse
    CDF in rank order, as over a full sort)."""
    vocab = x.size(-1)
    # Temperature keeps each row's order: rank the logits themselves.
    if c < vocab:
        values, order = x.topk(c, -1)
    else:
        values, order = x.sort(-1, descending=True)
    k = torch.where(rows.top_k > 0, rows.top_k, c).clamp_(max=c)  # rows unfiltered: any k
    weights = (values - best[:, None]).mul_(rows.inverse[:, None]).exp_()
    weights.masked_fill_(torch.arange(c, device=x.device) >= k[:, None], 0.0)
    # The top k's mass summed in rank order (the same bits whatever the candidates' count).
    norm = weights.cumsum(-1).gather(-1, (k - 1)[:, None]).squeeze(-1)
    probs = weights / norm[:, None]
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    nucleus = (rows.top_p > 0)[:, None]
    drop = nucleus & (probs.cumsum(-1) - probs >= rows.top_p[:, None])
    cdf = probs.masked_fill(drop, 0.0).double().cumsum(-1)
    # right=True: the first rank whose cdf exceeds the draw, so a zero-probability rank never wins.
    pick = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1])[:, None], right=True)
    return order.gather(-1, pick.clamp(max=c - 1)).squeeze(-1)


def pick(
    logits: torch.Tensor, requests: list[Request], cache: RowsCache | None = None
) -> list[torch.Tensor | None]:
    """[tokens, their logprobs or None, top logprobs' values or None, their ids or None]:
    device work only, nothing read on the host (the random draws are made here). `cache`: keeps
    the rows' settings on the device while the batch's requests stay the same."""
    device, vocab = logits.device, logits.size(-1)
    cache = cache or RowsCache()
    rows = cache.get(requests, vocab, device)
    uniform = None
    if rows.sampled:
        # A sampling request's own stream: one draw at every one of its steps.
        draws = [
            float(torch.rand((), generator=r.generator)) if r.temperature > 0 else 0.0
            for r in requests
        ]
        host = torch.tensor(draws, dtype=torch.float32, pin_memory=device.type == "cuda")
        uniform = host.to(device, non_blocking=True)
    tokens, best, total = draw(logits, rows, uniform)
    picked: list[torch.Tensor | None] = [tokens, None, None, None]
    want = [r.logprobs for r in requests]
    if any(want):
        # Each row's logprobs come the same way in any batch: from the sampling pass's sum for
        # the rows that share it, else from a log_softmax.
        x, k = logits.float(), min(max(r.top_logprobs for r in requests), vocab)
        lp = None
        if not all(share for share, w in zip(rows.shares_host, want) if w):
            lp = x.log_softmax(-1)
        if total is None:
            picked[1] = lp.gather(-1, tokens[:, None]).squeeze(-1)
            if k > 0:
                picked[2], picked[3] = lp.topk(k, dim=-1)
            return picked
        lse = best.float() + total.log()  # valid for the sharing rows
        picked[1] = x.gather(-1, tokens[:, None]).squeeze(-1) - lse
        if lp is not None:
            picked[1] = torch.where(rows.shares, picked[1], lp.gather(-1, tokens[:, None])[:, 0])
        if k > 0:
            values, picked[3] = x.topk(k, dim=-1)  # the same order as the logprobs'
            picked[2] = values - lse[:, None]
            if lp is not None:
                picked[2] = torch.where(rows.shares[:, None], picked[2], lp.gather(-1, picked[3]))
    return picked


def copy_to_host(picked: list[torch.Tensor | None]) -> tuple[list, Any]:
    """Start copying to the host; on CUDA into pinned memory, without waiting."""
    if picked[0].device.type != "cuda":
        return picked, None
    host = []
    for t in picked:
        if t is not None:
            t = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        host.append(t)
    done = torch.cuda.Event()
    done.record()
    return host, done


def read_copy(copy: tuple[list, Any]) -> list[list | None]:
    """Wait for copy_to_host's copy and read it as lists."""
    host, done = copy
    if done is not None:
        done.synchronize()
    return [None if t is None else t.tolist() for t in host]
