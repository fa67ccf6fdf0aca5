"""A model's own chat template: the Jinja text a Hugging Face tokenizer carries, rendered in a
sandbox, for the chat endpoint of an imported instruct model.

A template comes with the checkpoint (checkpoints_tools/import_hf.py writes it beside the
tokenizer.json it copies: `chat_template.jinja`, and `chat_template.json` with the special tokens
it names), so it is data from a file, not code: it is rendered by Jinja's immutable sandbox
(no attribute starting with an underscore, no mutation of the values handed in, bounded
ranges), as transformers renders it, with the same helpers templates are written against
(`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text) and the same
whitespace rules, so that a conversation becomes the same prompt text as there. Namespaces
refuse underscore-prefixed names too. Jinja before 3.1.6 had known sandbox escapes: refused.
The sandbox does not bound time (nested loops over its bounded ranges multiply), so a render
that runs past RENDER_SECONDS is stopped: a trace function, set for the render's thread alone,
checks the clock at each line the compiled template runs.

The assistant's turn ends at the eos token and at the `end_tokens` (what the model's
generation_config.json stops at, which for instruct models includes the end of a turn): a chat
request stops at any of their ids, as transformers' generation does.
"""

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import jinja2.utils

from toolkit.tokenizer import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
# {"bos_token": "...", "eos_token": "...", "end_tokens": ["...", ...]} (each optional)
SPECIALS_FILE = "chat_template.json"
MIN_JINJA = (3, 1, 6)
# A real template renders a conversation in milliseconds; one still running after this is stopped.
RENDER_SECONDS = 2.0


class ChatTemplateError(ValueError):
    """A template that cannot be read or compiled (naming its file), or that refused a
    conversation (its raise_exception message, or what the sandbox stopped)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled template (`render`) and the ids that end the assistant's turn."""

    path: Path
    text: str  # the template's source
    template: jinja2.Template
    specials: dict[str, str]  # bos_token, eos_token: the strings the template may name
    end_ids: frozenset[int]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` ([{role, content}]), ending where the assistant's turn
        begins (`add_generation_prompt`). ChatTemplateError: what the template refused."""
        try:
            with _time_bound(RENDER_SECONDS):
                return self.template.render(
                    messages=messages, add_generation_prompt=add_generation_prompt, **self.specials
                )
        except _OutOfTime:
            raise ChatTemplateError(
                f"the chat template ran past {RENDER_SECONDS:g} s on the conversation: stopped"
            ) from None
        except jinja2.TemplateError as e:  # raise_exception, or the sandbox's SecurityError
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
        except Exception as e:  # the template's own arithmetic or types, on these messages
            raise ChatTemplateError(
                f"the chat template failed on the conversation: {type(e).__name__}: {e}"
            ) from None


class _OutOfTime(BaseException):
    """Raised inside a render past its time (BaseException: no `except Exception` in the
    template's own helpers catches it)."""


@contextlib.contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    """Stop the Python code run inside, in this thread, once `seconds` have passed: a trace
    function checks the clock at each call and line (and restores whatever tracer was set)."""
    deadline = time.monotonic() + seconds

    def check(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OutOfTime
        return check

    previous = sys.gettrace()
    sys.settrace(check)
    try:
        yield
    finally:
        sys.settrace(previous)


def chat_template_beside(tokenizer_spec: str) -> Path | None:
    """The template that came with a tokenizer file (import_hf writes it there), if any."""
    path = Path(tokenizer_spec).parent / TEMPLATE_FILE
    return path if Path(tokenizer_spec).is_file() and path.is_file() else None


def load_chat_template(path: str | Path, tokenizer: Tokenizer) -> ChatTemplate:
    """Compile the template at `path`; its special tokens from SPECIALS_FILE beside it, each
    else the tokenizer's <bos> and <eod>, and the turn's end at the ids of its eos and end
    tokens (none given: <eod>). ChatTemplateError names the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{path}: not a readable text file: {e}") from None
    given, end_tokens = _specials(path.parent / SPECIALS_FILE)
    environment = _environment()
    try:
        template = environment.from_string(text)
    except Exception as e:  # jinja2.TemplateSyntaxError, and what a broken file raises
        raise ChatTemplateError(f"{path}: not a Jinja template: {e}") from None
    specials = {
        "bos_token": tokenizer.token_string(tokenizer.bos),
        "eos_token": tokenizer.token_string(tokenizer.eod),
    } | given
    ends = end_tokens + ([given["eos_token"]] if "eos_token" in given else [])
    end_ids = {tokenizer.eod} if not ends else set()
    for token in ends:
        ids = tokenizer.encode(token)
        if len(ids) != 1:
            raise ChatTemplateError(
                f"{path.parent / SPECIALS_FILE}: the end-of-turn token {token!r} is not one "
                "token of this tokenizer"
            )
        end_ids.add(ids[0])
    return ChatTemplate(path, text, template, specials, frozenset(end_ids))


def chat_template_for(given: str, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The template a --chat-template option names: 'auto', the one beside the tokenizer's
    file if it has one; 'none', no template; else a template file. None: no template."""
    path = None
    if given == "auto":
        file = getattr(tokenizer, "path", None)  # a tokenizer loaded from a file
        path = chat_template_beside(str(file)) if file is not None else None
    elif given != "none":
        path = Path(given)
    return load_chat_template(path, tokenizer) if path is not None else None


def _specials(path: Path) -> tuple[dict[str, str], list[str]]:
    """bos_token and eos_token, and end_tokens, as SPECIALS_FILE gives them (none: the file
    is optional)."""
    if not path.exists():
        return {}, []
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"{path}: not a readable JSON file: {e}") from None
    names = ("bos_token", "eos_token")
    if not isinstance(given, dict) or not all(isinstance(given.get(k, ""), str) for k in names):
        raise ChatTemplateError(f"{path}: bos_token and eos_token must be strings")
    ends = given.get("end_tokens", [])
    if not isinstance(ends, list) or not all(isinstance(t, str) for t in ends):
        raise ChatTemplateError(f"{path}: end_tokens must be a list of strings")
    return {k: given[k] for k in names if k in given}, ends


def _environment() -> jinja2.Environment:
    """Jinja's immutable sandbox, set up as transformers renders chat templates."""
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_JINJA:
        raise ChatTemplateError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes: chat templates need "
            f">= {'.'.join(map(str, MIN_JINJA))} (pip install -U jinja2)"
        )

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own escapes HTML characters, which would change a prompt's text.
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, namespace=_Namespace
    )
    return env


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace (a record a template's loops may write), refusing underscore-prefixed
    names: nothing a template stores can shadow Python's internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"a namespace attribute may not start with an underscore: {name!r}"
        )
