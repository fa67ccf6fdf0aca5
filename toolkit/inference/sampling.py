"""Sampling one token per row when every row brings its own settings and its own random draw.

The draw is a uniform number per row, mapped through the row's filtered distribution (inverse
CDF): a request's random stream then depends only on its own seed, never on which other requests
share the batch.
"""

import torch


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
