"""Reading a recipe: TOML file -> table -> `--set` overrides -> typed sections -> validated Recipe.

Every error names the key and the reason, e.g.
``recipes/x.toml: model.hidden_size: expected int, got str 'big'``.
"""

import argparse
import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from toolkit.config.base import RecipeError, shown, type_name
from toolkit.config.recipe import Recipe, WorldSize, validate


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a table [{key}], got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: 1 followed by 400 zeros
            raise RecipeError(f"{key}: {shown(value)} is too large for a float") from None
    if tp in (int, str, bool, float) and (type(value) is not tp):
        raise RecipeError(
            f"{key}: expected {type_name(tp)}, got {type(value).__name__} {shown(value)}"
        )
    return value


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{full}: unknown key{hint}; valid keys: {', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], full)
    for name, f in fields.items():
        missing_default = (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if name not in kwargs and missing_default:
            full = f"{prefix}.{name}" if prefix else name
            raise RecipeError(f"{full}: required key is missing ({f.metadata.get('help', '')})")
        if name not in kwargs and f.default is None and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def apply_override(table: dict[str, Any], assignment: str) -> None:
    """Apply `section.key=value` (the value in TOML syntax, or a bare string) to a raw table."""
    path, sep, text = assignment.partition("=")
    if not sep or not path.strip():
        raise RecipeError(f"--set {assignment!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except ValueError:  # not TOML (TOMLDecodeError), or an integer of over 4300 digits
        value = text
    *sections, leaf = path.strip().split(".")
    node = table
    for s in sections:
        node = node.setdefault(s, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {assignment!r}: {s} is not a section")
    node[leaf] = value


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe argument and --set overrides, shared by every entry point that trains."""
    parser.add_argument("recipe", help="recipe TOML file, e.g. recipes/tiny_hybrid.toml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)",
    )


def recipe_from_dict(
    table: dict[str, Any], overrides: list[str] = (), world_size: WorldSize = None
) -> Recipe:
    table = {k: dict(v) if isinstance(v, dict) else v for k, v in table.items()}
    for assignment in overrides:
        apply_override(table, assignment)
    recipe = _build(Recipe, table, "")
    validate(recipe, world_size)
    return recipe


def load_recipe(
    path: str | Path, overrides: list[str] = (), world_size: WorldSize = None
) -> Recipe:
    """Read, type-check and validate a recipe (with world_size: for that many ranks, or 'slurm'
    for its Slurm job's); RecipeError messages start with the file name."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_bytes().decode("utf-8"))  # UTF-8 whatever the locale
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory; give a recipe .toml file") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); TOML is UTF-8") from None
    except ValueError as e:  # TOMLDecodeError, or an integer of over 4300 digits
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    try:
        return recipe_from_dict(table, overrides, world_size)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
