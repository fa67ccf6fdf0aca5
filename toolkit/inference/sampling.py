"""Sampling one token per row when every row brings its own settings and its own random draw.

The draw is a uniform number per row, mapped through the row's filtered distribution (inverse
CDF): a request's random stream then depends only on its own seed, never on which other requests
share the batch. What a step costs depends on the settings present, known on the host:
- temperature only: the CDF over the vocabulary in its own order, no sort;
- top-k (then top-p): the best max(top_k) tokens (torch.topk), ranked as a full sort would;
- top-p without top-k: the best NUCLEUS_CANDIDATES tokens, with the whole vocabulary's
  normaliser; a row whose nucleus reaches past them is sorted in full (a flat distribution).
Filtering rules: top_k, then top_p over what is left (a token is dropped when the tokens ranked
above it already cover top_p; the first always stays); temperature 0 is greedy.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from toolkit.inference.request import Request

# Top-p without top-k: the best tokens ranked before falling back to a full sort. A peaked
# distribution's nucleus lies well inside; a flat one's does not, and is sorted.
NUCLEUS_CANDIDATES = 1024


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
        # Sampled at temperature 1 without top-k: the pass over the whole vocabulary sums
        # exp(logits - max), the softmax's normaliser.
        shares = [t == 1 and k == 0 for t, k in zip(temperature, ks)]
        columns = [
            list(temperature),
            [1 / t if t > 0 else 1.0 for t in temperature],
            ks,  # exact in float32 below 2**24
            ps,
            [s and not f for s, f in zip(sampled, filtered)],
            filtered,
            nucleus_only,
            shares,
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
            shares=dev[7].bool(),
            shares_host=tuple(shares),
        )

    def select(self, index: torch.Tensor) -> "Rows":
        """The rows at `index` (a device tensor)."""
        tensors = {
            f: getattr(self, f)[index]
            for f in ("temperature", "inverse", "top_k", "top_p", "plain", "filtered", "shares")
        }
        return replace(self, **tensors, nucleus_only=self.nucleus_only[index])


class RowsCache:
    """The last batch's Rows, kept while the same requests run in the same rows; and whether
    top-p rows lately needed the full sort (then sorted at once for a while: a flat
    distribution stays flat for some steps, and the candidates would be wasted work)."""

    RESORT_STEPS = 16  # steps sorted in full after a nucleus reached past its candidates

    def __init__(self) -> None:
        self.requests: tuple[Request, ...] = ()
        self.vocab = 0
        self.rows: Rows | None = None
        self.sort_steps = 0  # steps left to sort top-p rows in full

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

    def nucleus_candidates(self) -> int:
        if self.sort_steps:
            self.sort_steps -= 1
            return 1 << 62  # more than any vocabulary: a full sort
        return NUCLEUS_CANDIDATES

    def saw_wide(self, wide: bool) -> None:
        if wide:
            self.sort_steps = self.RESORT_STEPS


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
    logits: torch.Tensor,
    rows: Rows,
    uniform: torch.Tensor | None,
    nucleus_candidates: int = NUCLEUS_CANDIDATES,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool]:
    """Token ids [b] for `rows`' settings and draws (float32); also, when a row samples,
    each row's largest logit [b] and the sums of exp((logits - largest) / temperature) [b] when computed (else None), and
    whether a top-p row's nucleus reached past its `nucleus_candidates` best tokens (then it
    was sorted in full). A row's token depends on its own logits, settings and draw only."""
    if not rows.sampled:
        return logits.argmax(-1), None, None, False
    best, tokens = logits.max(-1)  # the greedy tokens, and each row's top for a stable exp
    x, best = logits.float(), best.float()
    total, wide = None, False
    if rows.any_plain or rows.any_nucleus_only:
        natural, total = _natural(x, best, rows.inverse, uniform)
        if rows.any_plain:
            tokens = torch.where(rows.plain, natural, tokens)
    if rows.max_k or rows.any_nucleus_only:
        c = max(rows.max_k, nucleus_candidates if rows.any_nucleus_only else 0)
        c = x.size(-1) if c > x.size(-1) // 2 else c  # a partial selection would cost a sort
        ranked, wide = _ranked(x, best, rows, uniform, total, c)
        tokens = torch.where(rows.filtered, ranked, tokens)
    return tokens, best, total, wide


def _exp_cumsum(x: torch.Tensor, best: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """cumsum(exp((x - best) / T)) along each row: the row's top maps to 1, nothing overflows.
    Every op acts on each element alone, or along its row: the same bits in any batch."""
    return (x - best[:, None]).mul_(inverse[:, None]).exp_().cumsum_(-1)


def _natural(
    x: torch.Tensor, best: torch.Tensor, inverse: torch.Tensor, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfiltered sampling: the inverse CDF over the vocabulary in its own order (the same
    distribution as over a ranking, and no sort). Also the softmax's normaliser per row."""
    cdf = _exp_cumsum(x, best, inverse)
    total = cdf[:, -1]
    # right=True: the first token whose cdf exceeds the draw, so a token of zero probability
    # never wins (u * total < total for a float32 u < 1: no token past the last possible one).
    pick = torch.searchsorted(cdf, (uniform * total)[:, None], right=True).squeeze(-1)
    return pick.clamp_(max=x.size(-1) - 1), total


def _ranked(
    x: torch.Tensor,
    best: torch.Tensor,
    rows: Rows,
    uniform: torch.Tensor,
    total: torch.Tensor | None,
    c: int,
) -> tuple[torch.Tensor, bool]:
    """Top-k / top-p sampling over the rows' best `c` tokens ranked best first (the inverse CDF
    in rank order, as over a full sort); top-p rows whose nucleus reaches past them are sorted
    in full (and the second result is True). `total`: the whole vocabulary's normaliser
    (needed for top-p rows without top-k)."""
    vocab = x.size(-1)
    # Temperature keeps each row's order: rank the logits themselves.
    if c < vocab:
        values, order = x.topk(c, -1)
    else:
        values, order = x.sort(-1, descending=True)
    k = torch.where(rows.top_k > 0, rows.top_k, c).clamp_(max=c)  # rows unfiltered: any k
    weights = (values - best[:, None]).mul_(rows.inverse[:, None]).exp_()
    weights.masked_fill_(torch.arange(c, device=x.device) >= k[:, None], 0.0)
    # The top k's mass summed in rank order (the same bits whatever the candidates' count);
    # top-p alone: the whole vocabulary's.
    norm = weights.cumsum(-1).gather(-1, (k - 1)[:, None]).squeeze(-1)
    if total is not None:
        norm = torch.where(rows.nucleus_only, total, norm)
    probs = weights / norm[:, None]
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    nucleus = (rows.top_p > 0)[:, None]
    drop = nucleus & (probs.cumsum(-1) - probs >= rows.top_p[:, None])
    cdf = probs.masked_fill(drop, 0.0).double().cumsum(-1)
    # right=True: the first rank whose cdf exceeds the draw, so a zero-probability rank never wins.
    pick = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1])[:, None], right=True)
    tokens = order.gather(-1, pick.clamp(max=c - 1)).squeeze(-1)
    wide = False
    if c < vocab and rows.any_nucleus_only:
        # Not one candidate dropped: the nucleus may reach past them (reads the device).
        index = (rows.nucleus_only & ~drop[:, -1]).nonzero().squeeze(-1)
        if index.numel():
            sub = rows.select(index)
            tokens[index] = _ranked(
                x[index], best[index], sub, uniform[index], total[index], vocab
            )[0]
            wide = True
    return tokens, wide


def pick(
    logits: torch.Tensor, requests: list[Request], cache: RowsCache | None = None
) -> list[torch.Tensor | None]:
    """[tokens, their logprobs or None, top logprobs' values or None, their ids or None]:
    device work only, nothing read on the host (the random draws are made here), except where
    a top-p row's nucleus reaches past its candidates. `cache`: keeps the rows' settings on the
    device while the batch's requests stay the same."""
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
    tokens, best, total, wide = draw(logits, rows, uniform, cache.nucleus_candidates())
    cache.saw_wide(wide)
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
