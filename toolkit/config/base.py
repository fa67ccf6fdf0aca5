"""What every recipe section is built from: the error type, fields with help text, the check."""

import typing
from dataclasses import field
from typing import Any, Literal


class RecipeError(ValueError):
    """A recipe is malformed: the message names the file, the key and what to do."""


def opt(default: Any, help: str) -> Any:
    """A recipe field with its help text (listed by `python -m toolkit.config --keys`)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def req(help: str) -> Any:
    return field(metadata={"help": help})


def check(ok: bool, key: str, why: str) -> None:
    """RecipeError 'key: why' unless ok."""
    if not ok:
        raise RecipeError(f"{key}: {why}")


def shown(value: Any) -> str:
    """repr(value) cut to a readable length for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def type_name(tp: Any) -> str:
    """A field's type as a recipe writer reads it: 'int', "'gelu' | 'relu2'"."""
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
