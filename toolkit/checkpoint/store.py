"""A checkpoint is a Zarr v3 group per step: one array per tensor, JSON metadata, no pickle.

Layout of `<root>`:
    step_00000100/        a published checkpoint (zarr group; its attributes hold the metadata)
        model/<array>                 e.g. model/layers.0.mixer.in_proj.weight.x
        optim/<array>/exp_avg         Adam moments (fp32), same shape and chunks as the parameter
        rng/rank_00000                each rank's torch RNG state (uint8)
    latest                text file naming the newest published step directory
    .tmp-step_00000100    a checkpoint being written (ignored by readers, removed by the next save)

Commit protocol: create every array's metadata, let each writer fill its own chunks (writers never
share a chunk), read them back and compare, fsync, rename the directory into place, then
atomically replace `latest`. A crash at any point leaves the previous checkpoint and pointer
intact. Every chunk carries a CRC32C checksum; every chunk file is written, zeros too, so a
missing file is an error rather than silent zeros.

bfloat16 (which zarr and numpy lack) is stored as its raw uint16 bits with the array attribute
`{"dtype": "bfloat16"}`: a plain numpy user reads it with
`torch.from_numpy(arr[...].view(np.int16)).view(torch.bfloat16)`, or `(arr[...].astype(np.uint32)
<< 16).view(np.float32)` without torch.

This module is the store; `toolkit.checkpoint.sharded` decides which rank writes what.
"""

import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec
from zarr.storage import LocalStore

from toolkit.checkpoint import placement

FORMAT = "hybrid-toolkit-checkpoint"
FORMAT_VERSION = 2  # 2: packed weights split into components, vocabulary rows unpadded
WRITE_BLOCK_BYTES = 64 << 20  # a writer encodes and verifies at most about this much at a time


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the array or file."""


@dataclass(frozen=True)
class ArraySpec:
    key: str  # e.g. "model/layers.0.norm.weight"
    shape: tuple[int, ...]
    dtype: str  # torch's name: "float32", "bfloat16", ...
    chunks: tuple[int, ...]


@dataclass
class Checkpoint:
    """A checkpoint read whole: tensors by array name."""

    path: Path
    model: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


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


def spec_for(key: str, tensor: torch.Tensor) -> ArraySpec:
    """A whole tensor as one array, chunked along dim 0 when large."""
    shape = tuple(tensor.shape)
    chunks = placement.chunk_shape(shape, None, 0, tensor.element_size())
    return ArraySpec(key, shape, dtype_name(tensor.dtype), chunks)


# ---- reading, with a byte count for measuring read amplification ----


class ReadCounter:
    """Chunk files read and their bytes, checksums included (thread-safe: zarr reads from
    several threads)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.chunks = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            self.chunks += 1

    @property
    def payload_bytes(self) -> int:
        """The tensor data read: bytes without each chunk's 4-byte CRC32C."""
        return self.bytes - 4 * self.chunks


class _CountingStore(LocalStore):
    def __init__(self, root: Path | str, *, read_only: bool = True, counter=None) -> None:
        super().__init__(root, read_only=read_only)
        self.counter = counter

    def with_read_only(self, read_only: bool = False) -> "_CountingStore":
        return _CountingStore(self.root, read_only=read_only, counter=self.counter)

    async def get(self, key, prototype=None, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        if buf is not None and self.counter is not None and not key.endswith("zarr.json"):
            self.counter.add(len(buf))
        return buf


def open_checkpoint(path: str | Path, counter: ReadCounter | None = None) -> zarr.Group:
    """The step directory's group, after checking that it is a checkpoint this toolkit reads."""
    path = Path(path)
    try:
        group = zarr.open_group(_CountingStore(path, counter=counter), mode="r")
        attrs = dict(group.attrs)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint: {e}") from e
    if attrs.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} store (format={attrs.get('format')!r})")
    version = attrs.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is newer than this toolkit's {FORMAT_VERSION}; "
            "upgrade the toolkit"
        )
    if version < FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} predates this toolkit's {FORMAT_VERSION} "
            "(packed weights were not split into components); re-create it with the toolkit "
            "that wrote it"
        )
    return group


def metadata(group: zarr.Group) -> dict[str, Any]:
    return dict(group.attrs).get("metadata", {})


def open_array(group: zarr.Group, key: str) -> zarr.Array:
    """An array of the checkpoint, checked to have all its chunk files (zarr would silently
    return fill values for a missing one)."""
    try:
        arr = group[key]
    except KeyError:
        raise CheckpointError(f"{_where(group)}: array {key!r} is missing") from None
    if arr.nchunks_initialized != arr.nchunks:
        raise CheckpointError(
            f"{_where(group)}: array {key!r} has {arr.nchunks - arr.nchunks_initialized} of "
            f"{arr.nchunks} chunk files missing"
        )
    return arr


def read_region(arr: zarr.Array, index: tuple, where: str) -> torch.Tensor:
    """Read `arr[index]` (only the chunks it touches); checksums are verified on read."""
    try:
        data = arr[index if index else ...]
    except Exception as e:  # the codec raises on a checksum mismatch
        raise CheckpointError(f"{where}: cannot read array {arr.path!r}: {e}") from e
    return from_numpy(np.asarray(data), arr.attrs["dtype"])


def _where(group: zarr.Group) -> str:
    return str(getattr(group.store, "root", group.store))


# ---- writing ----


def begin(root: str | Path, step: int, meta: dict[str, Any]) -> Path:
    """Start the checkpoint of `step`: remove what crashed saves left, create the temporary
    group with its metadata. Returns the temporary directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dirname(step)
    if final.exists():
        raise CheckpointError(
            f"{final} already exists; a published checkpoint is never overwritten"
        )
    for leftover in [*root.glob(".tmp-step_*"), *root.glob(".trash-step_*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # from a save that crashed
    tmp = root / f".tmp-{final.name}"
    group = zarr.open_group(tmp, mode="w")
    group.attrs.update(
        {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "metadata": meta}
    )
    return tmp


def create_arrays(tmp: Path, specs: list[ArraySpec]) -> None:
    group = zarr.open_group(tmp, mode="r+")
    for spec in specs:
        group.create_array(
            spec.key,
            shape=spec.shape,
            dtype=_numpy_dtype(spec.dtype),
            chunks=spec.chunks,
            fill_value=0,
            compressors=[Crc32cCodec()],
            attributes={"dtype": spec.dtype},
        )


def write_region(group: zarr.Group, key: str, index: tuple, tensor: torch.Tensor) -> None:
    """Write `tensor` into `group[key][index]` and read it back bit for bit, a block of whole
    chunk rows at a time (bounded memory). Every chunk is written, zeros too: then a missing
    chunk file is an error, not silent zeros."""
    # The setting is not stored with the array: every writer must set it again.
    arr = group[key].with_config({"write_empty_chunks": True})
    data = to_numpy(tensor)
    if data.ndim == 0:
        _write_block(arr, ..., data, key)
        return
    rows = range(*(index[0] if index else slice(None)).indices(arr.shape[0]))
    row_bytes = max(data[:1].nbytes, 1)
    step = arr.chunks[0] * max(1, WRITE_BLOCK_BYTES // (row_bytes * arr.chunks[0]))
    for start in range(0, len(rows), step):
        block = slice(rows.start + start, rows.start + min(start + step, len(rows)))
        _write_block(arr, (block, *index[1:]), data[start : start + step], key)


def _write_block(arr: zarr.Array, index, data: np.ndarray, key: str) -> None:
    arr[index] = data
    back = np.asarray(arr[index])
    # Compare checksums of the raw bits (NaN payloads too) rather than copies of the bytes.
    if back.shape != data.shape or _crc(back) != _crc(data):
        raise CheckpointError(f"{arr.store}: {key} did not read back identically")


def _crc(a: np.ndarray) -> int:
    return google_crc32c.value(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def publish(tmp: Path, keep_last: int = 0) -> Path:
    """Make a fully written and verified temporary checkpoint the latest one; apply retention."""
    root = tmp.parent
    final = root / tmp.name.removeprefix(".tmp-")
    fsync_tree(tmp)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / "latest", final.name + "\n")
    if keep_last > 0:
        older = [p for p in list_checkpoints(root) if p.name < final.name]
        for old in older[: max(len(older) - (keep_last - 1), 0)]:
            # Rename first (atomic), so a crash never leaves a half-deleted step_* behind.
            trash = root / f".trash-{old.name}"
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    return final


def save_checkpoint(
    root: str | Path,
    step: int,
    model: dict[str, torch.Tensor],
    optim: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write, verify and publish whole tensors from one process (optimizer keys are
    '<array>/<state>'); returns the step directory. Sharded training saves through
    `toolkit.checkpoint.sharded`, which uses the same protocol with many writers."""
    tmp = begin(root, step, metadata)
    tensors = {f"model/{k}": v for k, v in model.items()} | {
        f"optim/{k}": v for k, v in optim.items()
    }
    create_arrays(tmp, [spec_for(key, t) for key, t in tensors.items()])
    group = zarr.open_group(tmp, mode="r+")
    for key, t in tensors.items():
        write_region(group, key, (), t)
    return publish(tmp, keep_last)


# ---- finding checkpoints ----


def list_checkpoints(root: str | Path) -> list[Path]:
    """Published step directories, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None if `root` has none yet."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint root (use its latest) or a step directory."""
    path = Path(path)
    if (path / "latest").is_file():
        return latest_checkpoint(path)
    if (path / "zarr.json").is_file():
        return path
    raise CheckpointError(f"{path}: neither a checkpoint directory nor a step directory")


def array_keys(group: zarr.Group, prefix: str) -> list[str]:
    """Keys ('model/…', 'optim/…/exp_avg') of every array under `prefix`, sorted."""
    if prefix not in group:
        return []
    return sorted(
        f"{prefix}/{name}"
        for name, node in group[prefix].members(max_depth=None)
        if isinstance(node, zarr.Array)
    )


def load_checkpoint(path: str | Path, counter: ReadCounter | None = None) -> Checkpoint:
    """Read a whole checkpoint (root or step directory); checksums are verified on read."""
    path = resolve_checkpoint(path)
    group = open_checkpoint(path, counter)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for prefix in ("model", "optim"):
        parts[prefix] = {
            key.removeprefix(prefix + "/"): read_region(open_array(group, key), (), str(path))
            for key in array_keys(group, prefix)
        }
    return Checkpoint(path, parts["model"], parts["optim"], metadata(group))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (root or step directory), without reading any array."""
    return metadata(open_checkpoint(resolve_checkpoint(path)))
