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
The sandbox bounds neither time (nested loops over its bounded ranges multiply) nor memory
(`'a' * 10**10`), so the template renders in a child process (toolkit/inference/
template_sandbox.py) of at most RENDER_MEMORY_BYTES, killed past RENDER_SECONDS.

The assistant's turn ends at the eos token and at the `end_tokens` (what the model's
generation_config.json stops at, which for instruct models includes the end of a turn): a chat
request stops at any of their ids, as transformers' generation does.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from toolkit.inference.template_sandbox import SandboxedTemplate, TemplateRefused
from toolkit.tokenizer import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
# {"bos_token": "...", "eos_token": "...", "end_tokens": ["...", ...]} (each optional)
SPECIALS_FILE = "chat_template.json"
# A real template renders a conversation in milliseconds and megabytes; one still running after
# this, or asking for more than this beyond its process's start-up size, is stopped.
RENDER_SECONDS = 2.0
RENDER_MEMORY_BYTES = 512 << 20


class ChatTemplateError(ValueError):
    """A template that cannot be read or compiled (naming its file), or that refused a
    conversation (its raise_exception message, or what the sandbox stopped)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled template (`render`) and the ids that end the assistant's turn."""

    path: Path
    text: str  # the template's source
    template: SandboxedTemplate
    specials: dict[str, str]  # bos_token, eos_token: the strings the template may name
    end_ids: frozenset[int]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` ([{role, content}]), ending where the assistant's turn
        begins (`add_generation_prompt`). ChatTemplateError: what the template refused."""
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.specials
            )
        except TemplateRefused as e:
            raise ChatTemplateError(_refusal(e)) from None


def _refusal(e: TemplateRefused) -> str:
    if e.kind == "refused":  # raise_exception, or the sandbox's SecurityError
        return f"the chat template refused the conversation: {e}"
    if e.kind == "failed":  # the template's own arithmetic or types, on these messages
        return f"the chat template failed on the conversation: {e}"
    if e.kind in ("time", "memory"):
        return f"the chat template {e} on the conversation: stopped"
    return f"the chat template could not render the conversation: {e}"  # its process died


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
    try:
        template = SandboxedTemplate(text, RENDER_MEMORY_BYTES, RENDER_SECONDS)
    except RuntimeError as e:  # a jinja2 with known sandbox escapes
        raise ChatTemplateError(str(e)) from None
    except TemplateRefused as e:
        if e.kind == "syntax":
            raise ChatTemplateError(f"{path}: not a Jinja template: {e}") from None
        raise ChatTemplateError(f"{path}: the chat template did not compile: {e}") from None
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
