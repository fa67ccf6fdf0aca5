"""A generation request: its prompt and settings, and what the engine fills in as it runs."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from toolkit.inference.incremental_text import IncrementalText
from toolkit.tokenizer import Tokenizer

FinishReason = Literal["length", "stop", "eod", "cancelled", "error"]


@dataclass(kw_only=True, eq=False)
class Request:
    """One prompt and how to continue it; the engine fills the fields below the line."""

    prompt: list[int]
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 0.0  # 0 or 1: off
    seed: int | None = None  # None: a fresh random seed
    stop: Sequence[str] = ()  # stop strings; the text ends before the first one generated
    stop_at_eod: bool = True
    stop_tokens: frozenset[int] = frozenset()  # more ids that end it as <eod> does (chat turns)
    logprobs: bool = False  # log-probabilities of the generated tokens
    score_prompt: bool = False  # and of the prompt's tokens (from the 2nd): prompt_logprobs
    top_logprobs: int = 0  # and the most likely alternatives at each generated position
    on_update: Callable[["Request"], None] | None = None  # called from the engine's thread

    tokens: list[int] = field(default_factory=list, init=False)
    token_logprobs: list[float] = field(default_factory=list, init=False)
    prompt_logprobs: list[float] = field(default_factory=list, init=False)
    alternatives: list[list[tuple[int, float]]] = field(default_factory=list, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    stop_offset: int | None = field(default=None, init=False)  # where the stop string begins
    error: str | None = field(default=None, init=False)
    cancelled: bool = field(default=False, init=False)  # set by cancel(), from any thread
    generator: torch.Generator | None = field(default=None, init=False, repr=False)
    # Engine steps (Engine.steps) when it was queued and when its first token was sampled.
    queued_step: int = field(default=0, init=False, repr=False)
    first_token_step: int | None = field(default=None, init=False, repr=False)
    decoded: IncrementalText = field(default_factory=IncrementalText, init=False, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def text(self, tokenizer: Tokenizer) -> str:
        """The generated tokens' text so far (decoded a few new tokens at a time)."""
        return self.decoded.text(self.tokens, tokenizer)

    def cancel(self) -> None:
        """Ask the engine to drop the request at its next step (its slot is freed)."""
        self.cancelled = True


def check_request(request: Request, max_len: int, vocab_size: int) -> None:
    """Raise ValueError if the request can never run within `max_len` tokens over a
    vocabulary of `vocab_size`."""
    if not request.prompt:
        raise ValueError("the prompt has no tokens")
    if request.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={request.max_new_tokens} is negative")
    total = len(request.prompt) + request.max_new_tokens
    if total > max_len:
        raise ValueError(
            f"prompt ({len(request.prompt)} tokens) plus generation "
            f"({request.max_new_tokens}) is {total} tokens, over the limit of {max_len}"
        )
    if max(request.prompt) >= vocab_size or min(request.prompt) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
    if request.seed is not None and not 0 <= request.seed < 2**64:
        raise ValueError(f"seed={request.seed} is not a 64-bit unsigned integer")


def finish_reason(r: Request, token: int, tokenizer: Tokenizer) -> FinishReason | None:
    """Why `r` ends with its newest token `token`, or None if it goes on."""
    if r.stop_at_eod and (token == tokenizer.eod or token in r.stop_tokens):
        return "eod"
    if r.stop:
        text = r.text(tokenizer)
        # Only an occurrence that ends in the newest token's text is new.
        since = max(0, len(text) - len(tokenizer.decode([token])) - _longest(r.stop))
        hits = [i for i in (text.find(s, since) for s in r.stop) if i >= 0]
        if hits:
            r.stop_offset = min(hits)
            return "stop"
    if len(r.tokens) >= r.max_new_tokens:
        return "length"
    return None


def _longest(strings: Sequence[str]) -> int:
    return max((len(s) for s in strings), default=0)
