"""Sampling one token per row when every row brings its own settings and its own random draw.

The draw is a uniform number per row, mapped through the row's filtered distribution (inverse
CDF): a request's random stream then depends only on its own seed, never on which other requests
share the batch.
"""

from typing import Any

import torch

from toolkit.inference.request import Request


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
    >= 1) are off, `uniform` in [0, 1) is the row's random draw. `any_sampled`: whether a row
    has a temperature, when the caller knows (None: read it from the device, which waits)."""
    greedy = logits.argmax(-1)
    sampled = temperature > 0
    if any_sampled is None:
        any_sampled = bool(sampled.any())
    if not any_sampled:
        return greedy
    vocab = logits.size(-1)
    scaled = logits.float() / torch.where(sampled, temperature, 1.0)[:, None]
    ranked, order = scaled.sort(-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab)
    ranked = ranked.masked_fill(rank >= k[:, None], -torch.inf)
    probs = ranked.softmax(-1)
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    nucleus = ((top_p > 0) & (top_p < 1))[:, None]
    drop = nucleus & (probs.cumsum(-1) - probs >= top_p[:, None])
    cdf = probs.masked_fill(drop, 0.0).double().cumsum(-1)
    # right=True: the first rank whose cdf exceeds the draw, so a zero-probability rank never wins.
    pick = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1])[:, None], right=True)
    token = order.gather(-1, pick.clamp(max=vocab - 1)).squeeze(-1)
    return torch.where(sampled, token, greedy)


def pick(logits: torch.Tensor, requests: list[Request]) -> list[torch.Tensor | None]:
    """[tokens, their logprobs or None, top logprobs' values or None, their ids or None]:
    device work only, nothing read on the host (the random draws are made here)."""

    device = logits.device

    def column(values: list[float | int], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
        return host.to(device, non_blocking=True)

    if all(r.temperature == 0 for r in requests):
        # All greedy: no draws (a sampling request's own stream is drawn at every one of
        # its steps either way) and no settings copied to the device.
        tokens = logits.argmax(-1)
    else:
        uniform = [float(torch.rand((), generator=r.generator)) for r in requests]
        tokens = sample(
            logits,
            temperature=column([r.temperature for r in requests], torch.float32),
            top_k=column([min(r.top_k, logits.size(-1)) for r in requests], torch.long),
            top_p=column([r.top_p for r in requests], torch.float32),
            uniform=column(uniform, torch.float64),
            any_sampled=True,
        )
    picked: list[torch.Tensor | None] = [tokens, None, None, None]
    if any(r.logprobs for r in requests):
        lp = logits.log_softmax(-1)
        picked[1] = lp.gather(-1, tokens[:, None]).squeeze(-1)
        k = max(r.top_logprobs for r in requests)
        if k > 0:
            picked[2], picked[3] = lp.topk(min(k, lp.size(-1)), dim=-1)
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
