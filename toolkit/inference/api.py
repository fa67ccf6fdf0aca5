"""The two HTTP APIs as plain functions: JSON body -> engine requests, finished requests -> JSON.

`PUT /api` keeps the field names of the reference (Megatron) text-generation server so that its
command-line client works; `POST /v1/completions` follows OpenAI's completions API. Every bad
value raises BadRequest naming the field (the server answers 400), never a 200 with an error.
"""

import time
import uuid
from dataclasses import dataclass
from typing import Any

from toolkit.inference.chat_template import ChatTemplate, ChatTemplateError
from toolkit.inference.engine import Request
from toolkit.tokenizer import Tokenizer

MAX_PROMPTS = 128
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds


class BadRequest(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Limits:
    max_len: int  # prompt + generation, in tokens


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(name, f"{name} must be a number, got {value!r}")
    if not lo <= value <= hi:  # also rejects NaN
        raise BadRequest(name, f"{name}={value} is out of range [{lo}, {hi}]")
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int, lo: int, hi: int = 2**31 - 1) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(name, f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise BadRequest(name, f"{name}={value} must be >= {lo}")
    if value > hi:
        raise BadRequest(name, f"{name}={value} must be <= {hi}")
    return value


def _flag(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(name, f"{name} must be true or false, got {value!r}")
    return value


def _strings(body: dict[str, Any], name: str, *, required: bool, most: int) -> list[str]:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(name, f"{name} is missing")
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(name, f"{name} must be a string or a list of strings")
    if required and not value:
        raise BadRequest(name, f"{name} is empty: send at least one")
    if len(value) > most:
        raise BadRequest(name, f"{name} has {len(value)} entries, at most {most} are allowed")
    return value


def _encode(
    prompts: list[str], field: str, tokenizer: Tokenizer, add_bos: bool, new: int, lim: Limits
) -> list[list[int]]:
    out = []
    for i, text in enumerate(prompts):
        try:
            ids = ([tokenizer.bos] if add_bos else []) + tokenizer.encode(text)
        except UnicodeEncodeError as e:  # a lone surrogate, which JSON can carry
            raise BadRequest(field, f"{field}[{i}] is not valid text: {e}") from None
        if not ids:
            raise BadRequest(field, f"{field}[{i}] is empty (set add_BOS to start from nothing)")
        _check_length(ids, f"{field}[{i}]", field, new, lim)
        out.append(ids)
    return out


def _check_length(ids: list[int], what: str, field: str, new: int, lim: Limits) -> None:
    if len(ids) + new > lim.max_len:
        raise BadRequest(
            field,
            f"{what} has {len(ids)} tokens; with {new} to generate that is "
            f"{len(ids) + new}, over the model's limit of {lim.max_len}",
        )


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_prompts(
    body: dict[str, Any], field: str, tokenizer: Tokenizer, new: int, lim: Limits
) -> list[list[int]] | None:
    """OpenAI's prompts as token ids (a list of ids, or a list of such lists), each id checked
    against the vocabulary; None where the prompts are text."""
    value = body.get(field)
    if not isinstance(value, list) or all(isinstance(v, str) for v in value):
        return None  # text (or missing, or not a list): _strings says what is wrong
    prompts = [value] if all(_is_token(v) for v in value) else value
    if not all(isinstance(p, list) and all(_is_token(t) for t in p) for p in prompts):
        raise BadRequest(
            field,
            f"{field} must be a string, a list of strings, a list of token ids or a list of "
            "lists of token ids",
        )
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(field, f"{field} has {len(prompts)} prompts, at most {MAX_PROMPTS}")
    vocab = tokenizer.vocab_size
    for i, ids in enumerate(prompts):
        if not ids:
            raise BadRequest(field, f"{field}[{i}] is empty: send at least one token")
        outside = [t for t in ids if not 0 <= t < vocab]
        if outside:
            raise BadRequest(
                field,
                f"{field}[{i}] has token ids outside the vocabulary [0, {vocab}): {outside[:5]}",
            )
        _check_length(ids, f"{field}[{i}]", field, new, lim)
    return prompts


def _one_filter(top_k: int, top_p: float, top_p_off: float) -> None:
    if top_k > 0 and top_p not in (0.0, top_p_off):
        raise BadRequest("top_p", "top_k and top_p cannot both be set: choose one")


def _settings(temperature: float, top_k: int, top_p: float, stop: list[str]) -> dict[str, Any]:
    """The requests' sampling settings. top_k=1 (the reference client's way to ask for greedy)
    runs as greedy: the same token, by argmax, without a random draw and a top-k pass at every
    step (the logprobs are the raw logits' either way)."""
    if top_k == 1:
        temperature, top_k = 0.0, 0
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, stop=tuple(stop))


def parse_megatron(body: dict[str, Any], tokenizer: Tokenizer, lim: Limits) -> list[Request]:
    """The reference server's request: one engine request per prompt."""
    prompts = _strings(body, "prompts", required=True, most=MAX_PROMPTS)
    new = _integer(body, "tokens_to_generate", 64, 0)
    logprobs = _flag(body, "logprobs")
    if new == 0 and not logprobs:
        raise BadRequest("tokens_to_generate", "tokens_to_generate=0 needs logprobs=true")
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    if temperature == 0:
        raise BadRequest("temperature", "temperature must be in (0, 100] (greedy: top_k=1)")
    top_k = _integer(body, "top_k", 0, 0)
    top_p = _number(body, "top_p", 0.0, 0.0, 1.0)
    _one_filter(top_k, top_p, 0.0)
    seed = _integer(body, "random_seed", -1, -1, MAX_SEED)
    if body.get("beam_width") not in (None, 1):
        raise BadRequest("beam_width", "beam search is not supported")
    # The reference's fields that change sampling in ways this server has not, refused unless
    # off; its beam search's own (stop_token, length_penalty) are checked and have no effect.
    for name in ("top_p_decay", "top_p_bound"):
        if _number(body, name, 0.0, 0.0, 1.0):
            raise BadRequest(name, f"{name} (top_p narrowed token by token) is not supported")
    if _flag(body, "prevent_newline_after_colon"):
        raise BadRequest(
            "prevent_newline_after_colon", "prevent_newline_after_colon is not supported"
        )
    _integer(body, "stop_token", 0, 0)
    _number(body, "length_penalty", 1.0, -100.0, 100.0)
    stop = _strings(body, "stop_strings", required=False, most=MAX_STOP_STRINGS)
    if _flag(body, "stop_on_double_eol"):
        stop.append("\n\n")
    if _flag(body, "stop_on_eol"):
        stop.append("\n")
    if any(not s for s in stop):
        raise BadRequest("stop_strings", "stop_strings must not contain empty strings")
    ids = _encode(prompts, "prompts", tokenizer, _flag(body, "add_BOS"), new, lim)
    settings = _settings(temperature, top_k, top_p, stop)
    seed_or_none = None if seed < 0 else seed
    return [
        Request(
            prompt=p,
            max_new_tokens=new,
            seed=seed_or_none,
            logprobs=logprobs,
            score_prompt=logprobs,
            **settings,
        )
        for p in ids
    ]


def generated_text(r: Request, tokenizer: Tokenizer, final: bool | None = None) -> str:
    """The output text so far. Unfinished, it holds back what may still change: an incomplete
    UTF-8 character and a tail that could become a stop string (never sent, then taken back)."""
    text = r.text(tokenizer)
    if r.done if final is None else final:
        return text if r.stop_offset is None else text[: r.stop_offset]
    text = text.rstrip("\ufffd")
    # A tail that a stop string begins with ends in one of the stop strings' characters before
    # their last: most tokens end in none, and the search below is skipped (~20 us a token).
    if not text or text[-1] not in "".join(s[:-1] for s in r.stop):
        return text
    for n in range(min(len(text), max((len(s) for s in r.stop), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in r.stop):
            return text[:-n]
    return text


def megatron_response(requests: list[Request], tokenizer: Tokenizer) -> dict[str, Any]:
    """`text` is prompt + generation; `segments` and `tokens` cover every token (a stop string's
    tokens included); `logprobs` follow the tokens from the second one."""
    logprobs = requests[0].logprobs
    return {
        "text": [tokenizer.decode(r.prompt) + generated_text(r, tokenizer) for r in requests],
        "segments": [[tokenizer.token_string(t) for t in r.prompt + r.tokens] for r in requests],
        "logprobs": [r.prompt_logprobs + r.token_logprobs for r in requests] if logprobs else None,
        "tokens": [r.prompt + r.tokens for r in requests],
    }


@dataclass
class Completion:
    """A parsed /v1/completions request."""

    requests: list[Request]
    stream: bool
    echo: bool
    logprobs: bool
    id: str
    created: int
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    chat: bool = False  # a /v1/chat/completions request: chat objects, not text_completion


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    """OpenAI's stream_options: {"include_usage": bool}, allowed with stream: true only."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise BadRequest("stream_options", "stream_options is allowed with stream: true only")
    if not isinstance(options, dict):
        raise BadRequest("stream_options", "stream_options must be an object")
    try:
        return _flag(options, "include_usage")
    except BadRequest as e:
        raise BadRequest("stream_options", f"stream_options.{e}") from None


def parse_completion(body: dict[str, Any], tokenizer: Tokenizer, lim: Limits) -> Completion:
    new = _integer(body, "max_tokens", 16, 0)
    ids = _token_prompts(body, "prompt", tokenizer, new, lim)
    if ids is None:
        texts = _strings(body, "prompt", required=True, most=MAX_PROMPTS)
        ids = _encode(texts, "prompt", tokenizer, False, new, lim)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _integer(body, "logprobs", 0, 0)
        if logprobs > MAX_TOP_LOGPROBS:
            raise BadRequest("logprobs", f"logprobs={logprobs}: at most {MAX_TOP_LOGPROBS}")
    if _integer(body, "best_of", 1, 1) != 1:
        raise BadRequest("n", "only one completion per prompt (n=1, best_of=1) is supported")
    echo = _flag(body, "echo")
    return _sampled(body, ids, new, logprobs, echo=echo, chat=False)


def parse_chat(
    body: dict[str, Any], tokenizer: Tokenizer, lim: Limits, template: ChatTemplate | None = None
) -> Completion:
    """An OpenAI chat request: its messages as one prompt, one completion. The prompt is the
    model's own chat `template`'s, the completion ending at its end of turn; without one,
    Megatron's template for pretrained models (chat_prompt)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "messages must be a non-empty list of {role, content}")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest("messages", f"messages has {len(messages)}, at most {MAX_MESSAGES}")
    turns = [_message(m, i) for i, m in enumerate(messages)]
    if template is None:
        text = chat_prompt(turns)
    else:
        try:
            text = template.render([{"role": role, "content": text} for role, text in turns])
        except ChatTemplateError as e:
            raise BadRequest("messages", str(e)) from None
    ids = _encode([text], "messages", tokenizer, False, 0, lim)[0]
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    new = _integer(body, name, max(lim.max_len - len(ids), 0), 0)  # default: the rest
    _check_length(ids, "messages", "messages", new, lim)
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    logprobs = _flag(body, "logprobs")
    if top and not logprobs:
        raise BadRequest("top_logprobs", "top_logprobs needs logprobs: true")
    c = _sampled(body, [ids], new, top if logprobs else None, echo=False, chat=True)
    if template is not None:
        for r in c.requests:
            r.stop_tokens = template.end_ids
    return c


def _message(m: Any, i: int) -> tuple[str, str]:
    """(role, text) of one chat message; its content a string or OpenAI's text parts."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in CHAT_ENDS:
        raise BadRequest("messages", f"{where} must have a role of {', '.join(CHAT_ENDS)}")
    content = m.get("content")
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise BadRequest("messages", f"{where}.content: only text parts are served here")
        content = "".join(texts)
    if not isinstance(content, str):
        raise BadRequest("messages", f"{where}.content must be a string or a list of text parts")
    return m["role"], content


# What ends each role's turn in the prompt: Megatron's chat template for pretrained models
# (its pretraining.jinja), for models trained here, which have no chat tokens of their own.
CHAT_ENDS = {"system": "\n", "user": "\n", "assistant": "\n\n"}
MAX_MESSAGES = 256


def chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The prompt of a conversation: each turn's text and its role's end (CHAT_ENDS); an empty
    system message adds nothing."""
    return "".join(text + CHAT_ENDS[role] for role, text in messages if text or role != "system")


def _refuse_unserved(body: dict[str, Any], chat: bool) -> None:
    """OpenAI's fields that would change the answer in ways this server has not: a 400 naming
    the field unless it is off (answering without them would be another answer than asked)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0):
            raise BadRequest(name, f"{name} is not supported: leave it 0")
    unserved = ["logit_bias"] + (["tools", "functions"] if chat else ["suffix"])
    for name in unserved:
        if body.get(name):
            raise BadRequest(name, f"{name} is not supported here")
    if chat and body.get("response_format") not in (None, {"type": "text"}):
        raise BadRequest("response_format", "only text answers are served (type: text)")


def _sampled(
    body: dict[str, Any],
    ids: list[list[int]],
    new: int,
    logprobs: int | None,
    *,
    echo: bool,
    chat: bool,
) -> Completion:
    """The sampling fields completions and chat share, and the requests of the prompts `ids`
    (`logprobs`: how many alternatives a token, None for no logprobs)."""
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)  # 0 is greedy here
    top_k = _integer(body, "top_k", 0, 0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise BadRequest("top_p", "top_p must be in (0, 1]")
    _one_filter(top_k, top_p, 1.0)
    if _integer(body, "n", 1, 1) != 1:
        raise BadRequest("n", "only one completion per prompt (n=1) is supported")
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(body, "seed", 0, 0, MAX_SEED)
    stop = _strings(body, "stop", required=False, most=MAX_STOP_STRINGS)
    if any(not s for s in stop):
        raise BadRequest("stop", "stop must not contain empty strings")
    ignore_eos = _flag(body, "ignore_eos")  # vLLM's extension: generate max_tokens regardless
    _refuse_unserved(body, chat)
    settings = _settings(temperature, top_k, top_p, stop)
    want = logprobs is not None
    requests = [
        Request(
            prompt=p,
            max_new_tokens=new,
            seed=seed,
            logprobs=want,
            score_prompt=want and echo,
            top_logprobs=logprobs or 0,
            stop_at_eod=not ignore_eos,
            **settings,
        )
        for p in ids
    ]
    stream = _flag(body, "stream")
    return Completion(
        requests=requests,
        stream=stream,
        echo=echo,
        logprobs=want,
        id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        created=int(time.time()),
        include_usage=_include_usage(body, stream),
        chat=chat,
    )


def finish_reason(r: Request) -> str | None:
    """OpenAI's names: a stop string and the end of document are both 'stop'."""
    return {"eod": "stop", "stop": "stop", "length": "length"}.get(r.finish_reason or "")


def completion_logprobs(
    r: Request, tokenizer: Tokenizer, tokens: range, with_prompt: bool, offset: int = 0
) -> dict[str, Any]:
    """OpenAI's logprobs object for the generated tokens in `tokens` (and the prompt's before
    them with echo; the prompt's positions have no alternatives: top_logprobs None there)."""
    ids = r.tokens[tokens.start : tokens.stop]
    lps: list[float | None] = list(r.token_logprobs[tokens.start : tokens.stop])
    top: list[dict[str, float] | None] = [
        {tokenizer.token_string(t): v for t, v in alt}
        for alt in r.alternatives[tokens.start : tokens.stop]
    ]
    if with_prompt:
        ids = r.prompt + ids
        lps = [None, *r.prompt_logprobs, *lps]
        top = [None] * len(r.prompt) + top
    strings = [tokenizer.token_string(t) for t in ids]
    offsets = []
    for s in strings:
        offsets.append(offset)
        offset += len(s)
    return {
        "tokens": strings,
        "token_logprobs": lps,
        "top_logprobs": top if r.top_logprobs else None,
        "text_offset": offsets,
    }


def completion_response(c: Completion, tokenizer: Tokenizer, model: str) -> dict[str, Any]:
    choices = []
    for i, r in enumerate(c.requests):
        prefix = tokenizer.decode(r.prompt) if c.echo else ""
        logprobs = None
        if c.logprobs:
            logprobs = completion_logprobs(r, tokenizer, range(len(r.tokens)), c.echo)
        choices.append(
            {
                "index": i,
                "text": prefix + generated_text(r, tokenizer),
                "logprobs": logprobs,
                "finish_reason": finish_reason(r),
            }
        )
    return _head(c, model) | {"choices": choices, "usage": usage(c)}


def usage(c: Completion) -> dict[str, int]:
    """OpenAI's token counts of a completion (all its prompts)."""
    prompt_tokens = sum(len(r.prompt) for r in c.requests)
    completion_tokens = sum(len(r.tokens) for r in c.requests)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_chunk(
    c: Completion, model: str, index: int, text: str, logprobs: Any, reason: str | None
) -> dict[str, Any]:
    """One server-sent event of a streamed completion (with stream_options.include_usage its
    usage is null: the last chunk, usage_chunk, carries it). For chat, the text is the
    choice's `delta`, and logprobs are chat's (chat_logprobs)."""
    choice: dict[str, Any] = {"index": index}
    if c.chat:
        choice["delta"] = {"content": text} if text else {}
    else:
        choice["text"] = text
    choice |= {"logprobs": logprobs, "finish_reason": reason}
    return _chunk(c, model, choice)


def chat_role_chunk(c: Completion, model: str, index: int) -> dict[str, Any]:
    """A chat stream's first event for a choice: its role, as OpenAI's streams begin."""
    choice = {"index": index, "delta": {"role": "assistant", "content": ""}}
    return _chunk(c, model, choice | {"logprobs": None, "finish_reason": None})


def _chunk(c: Completion, model: str, choice: dict[str, Any]) -> dict[str, Any]:
    """A stream event of one choice (usage null where the stream ends with usage_chunk)."""
    usage_field = {"usage": None} if c.include_usage else {}
    return _head(c, model, chunk=True) | {"choices": [choice]} | usage_field


def _head(c: Completion, model: str, chunk: bool = False) -> dict[str, Any]:
    kind = (
        ("chat.completion.chunk" if chunk else "chat.completion") if c.chat else "text_completion"
    )
    return {"id": c.id, "object": kind, "created": c.created, "model": model}


def chat_response(c: Completion, tokenizer: Tokenizer, model: str) -> dict[str, Any]:
    """OpenAI's chat.completion object: one assistant message a prompt."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": generated_text(r, tokenizer)},
            "logprobs": chat_logprobs(r, tokenizer, range(len(r.tokens))) if c.logprobs else None,
            "finish_reason": finish_reason(r),
        }
        for i, r in enumerate(c.requests)
    ]
    return _head(c, model) | {"choices": choices, "usage": usage(c)}


def chat_logprobs(r: Request, tokenizer: Tokenizer, tokens: range) -> dict[str, Any]:
    """Chat's logprobs object for the generated tokens in `tokens`: each token, its logprob,
    its UTF-8 bytes and its top_logprobs alternatives."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.token_string(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    content = []
    for k in tokens:
        item = entry(r.tokens[k], r.token_logprobs[k])
        item["top_logprobs"] = [entry(t, v) for t, v in r.alternatives[k]] if r.top_logprobs else []
        content.append(item)
    return {"content": content}


def usage_chunk(c: Completion, model: str) -> dict[str, Any]:
    """The last event of a stream with stream_options.include_usage: no choices, the usage."""
    return _head(c, model, chunk=True) | {"choices": [], "usage": usage(c)}
