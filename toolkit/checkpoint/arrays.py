"""A checkpoint's arrays as their zarr.json files describe them: the spec of an array to create,
the document zarr v3 would write for it, the parsed metadata of a stored one, how torch dtypes are
stored (bfloat16 as its raw uint16 bits), and finding the arrays under a group. Their chunk files
are chunks.py's; the checkpoint directory and its commit protocol are store.py's.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the array or file."""


@dataclass(frozen=True)
class ArraySpec:
    key: str  # e.g. "model/layers.0.norm.weight"
    shape: tuple[int, ...]
    dtype: str  # torch's name: "float32", "bfloat16", ...
    chunks: tuple[int, ...]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _numpy_dtype(dtype: str) -> np.dtype:
    if dtype == "bfloat16":
        return np.dtype(np.uint16)
    return torch.empty(0, dtype=getattr(torch, dtype)).numpy().dtype


# Arrays' metadata (zarr.json) and chunks are read and written here directly, in zarr's own
# layout (chunk files `c/i/j`, C-order little-endian bytes followed by their CRC32C), so threads
# work in parallel without zarr's event loop, which serialises every call at ~2 ms per array (a
# checkpoint of the 800M has 2,141 arrays); zarr-python reads the result as any other store.


@dataclass(frozen=True)
class StoredArray:
    """One array of a checkpoint as its zarr.json describes it."""

    root: Path  # the step directory
    path: str  # its key, e.g. "model/layers.0.norm.weight"
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype  # as stored: bfloat16 as uint16, attrs["dtype"] says which
    attrs: dict[str, Any]

    @property
    def ndim(self) -> int:
        return len(self.shape)


GROUP_METADATA = {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def array_metadata(spec: ArraySpec) -> dict[str, Any]:
    """The zarr.json of an array: what zarr-python 3 writes for `create_array(..., fill_value=0,
    compressors=[Crc32cCodec()])` (tests compare the two)."""
    dtype = _numpy_dtype(spec.dtype)
    layout = {"name": "bytes"}
    if dtype.itemsize > 1:
        layout["configuration"] = {"endian": "little"}
    return {
        "shape": list(spec.shape),
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(spec.chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0 if dtype.kind == "f" else 0,
        "codecs": [layout, {"name": "crc32c"}],
        "attributes": {"dtype": spec.dtype},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def group_dir(group: zarr.Group | Path) -> Path:
    """The directory of a zarr group (or the directory itself)."""
    if isinstance(group, zarr.Group):
        return Path(group.store.root) / group.path
    return Path(group)


def _node(group: zarr.Group | Path, key: str) -> dict[str, Any] | None:
    """The parsed zarr.json of `key` under `group`, or None if there is none."""
    path = group_dir(group) / key / "zarr.json"
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as e:  # a damaged file (not JSON, not UTF-8) is a damaged checkpoint
        raise CheckpointError(f"{path}: unreadable array metadata: {e}") from None


def has(group: zarr.Group | Path, key: str) -> bool:
    """Whether `key` (an array or a group) exists under `group`."""
    return (group_dir(group) / key / "zarr.json").is_file()


def open_array(group: zarr.Group | Path, key: str) -> StoredArray:
    root = group_dir(group)
    meta = _node(root, key)
    if meta is None or meta.get("node_type") != "array":
        raise CheckpointError(f"{root}: array {key!r} is missing")
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    endian = (meta.get("codecs") or [{}])[0].get("configuration", {}).get("endian", "little")
    encoding = meta.get("chunk_key_encoding", {})
    if (
        codecs != ["bytes", "crc32c"]
        or endian != "little"
        or encoding.get("configuration", {}).get("separator") != "/"
        or meta.get("chunk_grid", {}).get("name") != "regular"
    ):
        raise CheckpointError(
            f"{root}: array {key!r} is stored with codecs {codecs} and chunk keys {encoding}; "
            "this toolkit reads plain little-endian chunks with a CRC32C, under 'c/...'"
        )
    try:
        return StoredArray(
            root,
            key,
            tuple(meta["shape"]),
            tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]),
            np.dtype(meta["data_type"]),
            meta.get("attributes", {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{root}: array {key!r} has malformed metadata: {e!r}") from None


def array_keys(group: zarr.Group | Path, prefix: str) -> list[str]:
    """Keys ('model/…', 'optim/…/exp_avg') of every array under `prefix`, sorted."""
    root = group_dir(group)
    keys = []
    for dirpath, dirnames, files in os.walk(root / prefix):
        key = Path(dirpath).relative_to(root).as_posix()
        node = _node(root, key) if "zarr.json" in files else None
        if node is not None and node.get("node_type") == "array":
            keys.append(key)
            dirnames.clear()  # below an array: its chunks
    return sorted(keys)
