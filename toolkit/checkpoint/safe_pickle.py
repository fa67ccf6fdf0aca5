"""A restricted unpickler for checkpoint files written by other programs (DESIGN.md section 3).

Pass this module as torch.load's `pickle_module` (with weights_only=False): torch then reads
both its zip and its legacy format through `Unpickler` and `load` below, keeping its own
storage machinery (persistent_load) for the tensor data.

Globals on the allow-list (argparse.Namespace, the pieces of a numpy RNG state, torch dtypes,
tensor rebuild helpers, data-only builtins) resolve to the real objects. Every other global
becomes a `Placeholder` that records its module and name and takes whatever the pickle does
with it (calls, NEWOBJ, BUILD state, items) without running anything: an enum in a
checkpoint's args stays readable as a placeholder, and `os.system` named by a hostile file
is never looked up, let alone called. No module is ever imported.
"""

import _compat_pickle
import argparse
import collections
import io
import pickle
from typing import Any, BinaryIO

import numpy as np
import torch

UnpicklingError = pickle.UnpicklingError


class Placeholder:
    """A global the file names (`module.name`) that is not on the allow-list, or what the
    pickle made of it: `called` with `args`/`kwargs`, given `state`, `listitems`, `dictitems`.
    It runs nothing, compares by identity, and has no attributes beyond these."""

    __slots__ = ("module", "name", "called", "args", "kwargs", "state", "listitems", "dictitems")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name
        self.called, self.args, self.kwargs = False, (), {}
        self.state: Any = None
        self.listitems: list = []
        self.dictitems: list[tuple[Any, Any]] = []  # pairs: the keys may be unhashable

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        if not self.called:
            return f"<{self.qualname}, not loaded>"
        return f"<{self.qualname}(...), not called>"

    def call(self, args: tuple, kwargs: dict) -> "Placeholder":
        """What calling it would have made: a fresh placeholder recording the arguments."""
        made = Placeholder(self.module, self.name if not self.called else self.name + "(...)")
        made.called, made.args, made.kwargs = True, tuple(args), dict(kwargs)
        return made


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """_codecs.encode as protocol 2 uses it for bytes objects: str -> bytes, latin-1 only (no
    codec lookup, which could import an encodings module)."""
    if not isinstance(obj, str) or encoding.replace("-", "").lower() != "latin1":
        raise UnpicklingError(f"_codecs.encode({type(obj).__name__}, {encoding!r}) refused")
    return obj.encode("latin-1", errors)


def _allowed() -> dict[tuple[str, str], Any]:
    """(module, name) -> the object it resolves to. Built from modules already imported, by
    name, never by importing or by getattr on a name the file chose."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    table: dict[tuple[str, str], Any] = {
        ("argparse", "Namespace"): argparse.Namespace,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "UntypedStorage"): torch.UntypedStorage,
        ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 names
        table[(module, "_reconstruct")] = core._reconstruct
        table[(module, "scalar")] = core.scalar
    for name, value in vars(np.dtypes).items():
        if isinstance(value, type) and issubclass(value, np.dtype):
            table[("numpy.dtypes", name)] = value
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            table[("torch", name)] = value
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
    ):
        table[("torch._utils", name)] = getattr(torch._utils, name)
    for kind in (set, frozenset, bytearray, bytes, complex, slice, range, int, float, str, bool):
        table[("builtins", kind.__name__)] = kind
    for kind in (tuple, list, dict):
        table[("builtins", kind.__name__)] = kind
    return table


ALLOWED = _allowed()
# What a pickle may call (REDUCE, NEWOBJ, INST/OBJ) among the allowed objects: not the storage
# class (a size would allocate) and not the dtypes (not callable).
CALLABLE = {id(v): v for v in ALLOWED.values() if callable(v) and v is not torch.UntypedStorage}
# Real objects BUILD may give state to, by type: each takes it as plain data.
BUILDABLE = (argparse.Namespace, collections.OrderedDict, np.ndarray, np.dtype)


class Unpickler(pickle._Unpickler):  # the pure-Python one: its opcodes can be overridden
    """pickle's pure-Python unpickler with find_class and every opcode that calls, sets state
    or adds items restricted: allowed objects as pickle would, placeholders recording, the
    rest refused with UnpicklingError."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        found = ALLOWED.get((module, name))
        return found if found is not None else Placeholder(module, name)

    def _call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise UnpicklingError("a call's arguments are not a tuple and a dict")
        if isinstance(func, Placeholder):
            return func.call(args, kwargs)
        if id(func) not in CALLABLE:
            raise UnpicklingError(f"the pickle calls {func!r}, which is not allowed")
        return func(*args, **kwargs)

    def _new(self, cls: Any, args: Any, kwargs: Any = None) -> Any:
        if isinstance(cls, Placeholder):
            return cls.call(args, kwargs or {})
        if not isinstance(cls, type) or id(cls) not in CALLABLE:
            raise UnpicklingError(f"the pickle creates a {cls!r}, which is not allowed")
        return cls.__new__(cls, *args, **(kwargs or {}))

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args)

    def load_newobj_ex(self) -> None:
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args, kwargs)

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ (protocols 0, 1)
        self.append(self._call(klass, tuple(args)))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Placeholder):
            inst.state = state
        elif isinstance(inst, (np.ndarray, np.dtype)):
            inst.__setstate__(state)  # numpy's own: shape, dtype and raw bytes or a list
        elif type(inst) in BUILDABLE:
            if isinstance(state, tuple) and len(state) == 2:
                state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) as pickle
            if not isinstance(state, dict) or not all(
                isinstance(k, str) and not k.startswith("__") for k in state
            ):
                raise UnpicklingError(f"a {type(inst).__name__}'s state is not plain attributes")
            inst.__dict__.update(state)
        else:
            raise UnpicklingError(f"the pickle sets the state of a {type(inst).__name__}")

    def _add(self, items: list, opcode: str) -> None:
        target = self.stack[-1]
        if isinstance(target, Placeholder):
            target.listitems.extend(items)
        elif type(target) is list:
            target.extend(items)
        else:
            raise UnpicklingError(f"{opcode} to a {type(target).__name__}")

    def load_append(self) -> None:
        self._add([self.stack.pop()], "APPEND")

    def load_appends(self) -> None:
        self._add(self.pop_mark(), "APPENDS")

    def _set_items(self, items: list, opcode: str) -> None:
        target = self.stack[-1]
        pairs = list(zip(items[::2], items[1::2]))
        if isinstance(target, Placeholder):
            target.dictitems.extend(pairs)
        elif type(target) in (dict, collections.OrderedDict):
            target.update(pairs)
        else:
            raise UnpicklingError(f"{opcode} on a {type(target).__name__}")

    def load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._set_items([key, value], "SETITEM")

    def load_setitems(self) -> None:
        self._set_items(self.pop_mark(), "SETITEMS")

    def load_additems(self) -> None:
        items, target = self.pop_mark(), self.stack[-1]
        if isinstance(target, Placeholder):
            target.listitems.extend(items)
        elif type(target) is set:
            target.update(items)
        else:
            raise UnpicklingError(f"ADDITEMS to a {type(target).__name__}")

    def load_extension(self) -> None:  # copyreg's registry is process-wide: never consulted
        raise UnpicklingError("the pickle uses an extension code (copyreg registry)")

    for _opcode, _method in {
        pickle.REDUCE: load_reduce,
        pickle.NEWOBJ: load_newobj,
        pickle.NEWOBJ_EX: load_newobj_ex,
        pickle.BUILD: load_build,
        pickle.APPEND: load_append,
        pickle.APPENDS: load_appends,
        pickle.SETITEM: load_setitem,
        pickle.SETITEMS: load_setitems,
        pickle.ADDITEMS: load_additems,
        pickle.EXT1: load_extension,
        pickle.EXT2: load_extension,
        pickle.EXT4: load_extension,
    }.items():
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def load(file: BinaryIO, **kwargs: Any) -> Any:
    """pickle.load through the restricted Unpickler."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    return load(io.BytesIO(data), **kwargs)


def placeholders(obj: Any, limit: int = 10_000) -> list[Placeholder]:
    """The placeholders inside `obj` (dicts, lists, tuples, Namespaces), for error messages."""
    found: list[Placeholder] = []
    todo, seen = [obj], set()
    while todo and len(seen) < limit:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Placeholder):
            found.append(item)
        elif isinstance(item, dict):
            todo += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo += list(item)
        elif isinstance(item, argparse.Namespace):
            todo += list(vars(item).values())
    return found
