"""A checkpoint is a Zarr v3 group per step: one array per tensor, JSON metadata, no pickle.

Layout of `<root>`:
    step_00000100/        a published checkpoint (zarr group; its attributes hold the metadata)
        model/<array>                 e.g. model/layers.0.mixer.in_proj.weight.x
        optim/<array>/exp_avg         Adam moments (fp32), same shape and chunks as the parameter
        rng/rank_00000                each rank's torch RNG state (uint8)
    latest                text file naming the newest published step directory
    .tmp-step_00000100    a checkpoint being written (ignored by readers, removed by the next save)

Commit protocol: create every array's metadata, let each writer fill its own chunks (writers never
share a chunk) with their checksums, fsync, rename the directory into place, then
atomically replace `latest`. A crash at any point leaves the previous checkpoint and pointer
intact. Every chunk carries a CRC32C checksum; every chunk file is written, zeros too, so a
missing file is an error rather than silent zeros.

bfloat16 (which zarr and numpy lack) is stored as its raw uint16 bits with the array attribute
`{"dtype": "bfloat16"}`: a plain numpy user reads it with
`torch.from_numpy(arr[...].view(np.int16)).view(torch.bfloat16)`, or `(arr[...].astype(np.uint32)
<< 16).view(np.float32)` without torch.

This module is the store; `toolkit.checkpoint.sharded` decides which rank writes what.
"""

import ctypes
import itertools
import json
import math
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr

FORMAT = "hybrid-toolkit-checkpoint"
FORMAT_VERSION = 2  # 2: packed weights split into components, vocabulary rows unpadded


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the array or file."""


@dataclass(frozen=True)
class ArraySpec:
    key: str  # e.g. "model/layers.0.norm.weight"
    shape: tuple[int, ...]
    dtype: str  # torch's name: "float32", "bfloat16", ...
    chunks: tuple[int, ...]


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


def open_checkpoint(path: str | Path) -> zarr.Group:
    """The step directory's group, after checking that it is a checkpoint this toolkit reads."""
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r")
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


def _array_dir(arr: StoredArray) -> Path:
    return arr.root / arr.path


def _chunk_file(array_dir: Path, coords: tuple[int, ...]) -> Path:
    return array_dir.joinpath("c", *map(str, coords))


def _boxes(arr: StoredArray, region: list[range]):
    """(chunk coords, chunk box, the part of the box inside `region`) for every chunk `region`
    touches."""
    spans = [
        range(r.start // c, (r.stop + c - 1) // c) if len(r) else range(0)
        for r, c in zip(region, arr.chunks)
    ]
    for coords in itertools.product(*spans):
        box = [range(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, arr.chunks, arr.shape)]
        inside = [range(max(b.start, r.start), min(b.stop, r.stop)) for b, r in zip(box, region)]
        yield coords, box, inside


def _read_into(f: Any, buffer: np.ndarray) -> bool:
    """Fill `buffer` from the file; False if the file ends first."""
    view, filled = memoryview(buffer), 0
    while filled < len(view):  # a single read may return less (over 2 GiB on Linux)
        n = f.readinto(view[filled:])
        if not n:
            return False
        filled += n
    return True


def _region(arr: StoredArray, index: tuple) -> list[range]:
    index = tuple(index) + (slice(None),) * (arr.ndim - len(index))
    return [range(*sl.indices(n)) for sl, n in zip(index, arr.shape)]


# Chunk files are read, written, checksummed and fsynced by this pool's threads (file I/O and
# CRC32C release the GIL), also when one array has many chunks. TOOLKIT_CHECKPOINT_THREADS tunes
# it for a file system (a parallel one wants more threads, one spinning disk fewer).
CHUNK_THREADS = int(
    os.environ.get("TOOLKIT_CHECKPOINT_THREADS") or min(32, 2 * (os.cpu_count() or 1))
)
_CHUNK_POOL = ThreadPoolExecutor(CHUNK_THREADS, "checkpoint-chunk")


def can_read_into(arr: StoredArray, index: tuple, tensor: torch.Tensor) -> bool:
    """Whether `read_region(arr, index, out=tensor)` can fill `tensor` in place: CPU memory,
    contiguous, the stored dtype and the region's shape."""
    return (
        tensor.device.type == "cpu"
        and tensor.is_contiguous()
        and dtype_name(tensor.dtype) == arr.attrs["dtype"]
        and tuple(tensor.shape) == tuple(len(r) for r in _region(arr, index))
    )


def read_region(
    arr: StoredArray,
    index: tuple,
    where: str,
    counter: ReadCounter | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Read `arr[index]` (plain slices), touching only the chunk files it needs; every chunk's
    checksum is verified, and a missing chunk file is an error (zarr would return zeros).
    With `out` (see `can_read_into`), the chunks are read straight into its memory: a restored
    parameter needs no fresh buffer (page faults) and no copy."""
    region = _region(arr, index)
    if out is not None:
        if not can_read_into(arr, index, out):
            raise ValueError(f"{arr.path}: cannot read {region} into {out.dtype} {out.shape}")
        result, out = out, to_numpy(out)  # a view of the same memory
    else:
        out = np.empty([len(r) for r in region], dtype=arr.dtype)
        result = None
    array_dir, nbytes = _array_dir(arr), arr.dtype.itemsize * math.prod(arr.chunks)

    def read_chunk(coords: tuple[int, ...], box: list[range], inside: list[range]) -> None:
        path = _chunk_file(array_dir, coords)
        src = tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inside, box))
        dst = tuple(slice(i.start - r.start, i.stop - r.start) for i, r in zip(inside, region))
        target = out[dst] if out.ndim else out  # out[()] of a 0-d array is a copy
        # A whole chunk landing on contiguous memory of `out` (row-split arrays, whole-array
        # reads) is read straight into it: no intermediate buffer, no copy.
        direct = inside == box and target.shape == tuple(arr.chunks) and target.flags.c_contiguous
        try:
            with open(path, "rb", buffering=0) as f:
                if direct:
                    payload = target.reshape(-1).view(np.uint8)
                    ok = os.fstat(f.fileno()).st_size == nbytes + 4 and _read_into(f, payload)
                    crc = f.read(4) if ok else b""
                else:
                    raw = f.read()
                    ok = len(raw) == nbytes + 4
                    payload = np.frombuffer(raw, dtype=np.uint8)[:-4]
                    crc = raw[-4:]
        except FileNotFoundError:
            raise CheckpointError(
                f"{where}: array {arr.path!r}: chunk file {path.relative_to(array_dir)} is missing"
            ) from None
        if counter is not None:
            counter.add(nbytes + 4)
        if not ok or google_crc32c.value(payload) != int.from_bytes(crc, "little"):
            raise CheckpointError(
                f"{where}: array {arr.path!r}: chunk {path.relative_to(array_dir)} is corrupted "
                "(checksum mismatch or wrong size)"
            )
        if not direct:
            chunk = payload.view(arr.dtype).reshape(arr.chunks)
            target[...] = chunk[src]

    _run_all(read_chunk, list(_boxes(arr, region)))
    return result if result is not None else from_numpy(out, arr.attrs["dtype"])


def _run_all(fn: Callable, calls: list[tuple]) -> list:
    """fn(*args) for every args, on the chunk pool when there is more than one."""
    if len(calls) <= 1:
        return [fn(*args) for args in calls]
    return [f.result() for f in [_CHUNK_POOL.submit(fn, *args) for args in calls]]


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
    """Write the metadata (zarr.json) of every array and of the groups above them, in parallel.
    `publish` fsyncs them."""
    documents: dict[str, dict[str, Any]] = {}
    for spec in specs:
        parts = spec.key.split("/")
        for i in range(1, len(parts)):
            documents.setdefault("/".join(parts[:i]), GROUP_METADATA)
        documents[spec.key] = array_metadata(spec)
    _run_all(_write_node, [(tmp / key, doc) for key, doc in documents.items()])


def _write_node(directory: Path, document: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "zarr.json").write_text(json.dumps(document, indent=2))


def write_region(
    group: zarr.Group | Path, key: str, index: tuple, tensor: torch.Tensor
) -> list[Path]:
    """Write `tensor` into `group[key][index]`, whose chunks it must cover whole (writers never
    share a chunk), each chunk file with its checksum. Returns the files
    written: the caller fsyncs them (`fsync_files`), all at once. Each chunk is taken from the
    tensor as it is written: a GPU tensor's chunks are copied to the host by the chunk threads,
    overlapping the copies with other chunks' writes (not the whole tensor first)."""
    arr = open_array(group, key)
    data = tensor.detach()
    region = _region(arr, index)
    if tuple(data.shape) != tuple(len(r) for r in region):
        raise CheckpointError(f"{key}: data of shape {tuple(data.shape)} for region {region}")
    array_dir = _array_dir(arr)

    def write_chunk(coords: tuple[int, ...], box: list[range], inside: list[range]) -> Path:
        if inside != box:
            raise CheckpointError(f"{key}: region {region} cuts chunk {coords} (a layout bug)")
        part = data[tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, region))]
        part = to_numpy(part)  # a view of CPU memory; a copy of this chunk from a GPU
        if part.shape != tuple(arr.chunks):  # an edge chunk: zarr stores it whole, padded
            padded = np.zeros(arr.chunks, dtype=part.dtype)
            padded[tuple(slice(0, n) for n in part.shape)] = part
            part = padded
        payload = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
        crc = google_crc32c.value(payload).to_bytes(4, "little")
        path = _chunk_file(array_dir, coords)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            written = f.write(payload) + f.write(crc)
            f.flush()
            _start_writeback(f.fileno())  # a no-op unless EARLY_WRITEBACK
        # No read-back: before the fsync it would come from the page cache and prove nothing
        # about the disk. Readers verify every chunk's checksum (and inspect.py --verify).
        if written != len(payload) + 4:
            raise CheckpointError(f"{path}: short write ({written} of {len(payload) + 4} bytes)")
        return path

    return _run_all(write_chunk, list(_boxes(arr, region)))


def _load_sync_file_range() -> Callable[[int], None]:
    """Linux's sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE): start writing a file's dirty
    pages to disk now, without waiting. Elsewhere, nothing (the final fsync does it all)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
        call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    except (OSError, AttributeError):
        return lambda fd: None
    return lambda fd: call(fd, 0, 0, 2)


# TOOLKIT_CHECKPOINT_EARLY_WRITEBACK=1: each chunk's bytes head for the disk as soon as they are
# written, while other chunks are still being written, instead of all in the final fsync. Off by
# default: on the development VM it made saves slower (7.3-8.5 s against 5.9-6.8 s for 7 GB);
# benchmarks/checkpoint_io.py measures both where it matters.
EARLY_WRITEBACK = os.environ.get("TOOLKIT_CHECKPOINT_EARLY_WRITEBACK", "0") == "1"
_start_writeback = _load_sync_file_range() if EARLY_WRITEBACK else (lambda fd: None)


def fsync_files(paths: list[Path]) -> None:
    """Flush written chunk files to disk, in parallel."""
    _run_all(_fsync, [(p,) for p in paths])


def _fsync(path: Path | str) -> None:
    """fsync a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_metadata(path: Path) -> None:
    """fsync every zarr.json and directory under `path` (writers fsync their chunk files), in
    parallel: one by one, thousands of them took seconds."""
    paths = []
    for dirpath, _, files in os.walk(path):
        paths += [(os.path.join(dirpath, "zarr.json"),)] if "zarr.json" in files else []
        paths.append((dirpath,))
    _run_all(_fsync, paths)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def point_latest(step_dir: Path) -> None:
    """Atomically make `latest` (beside the step directory) name it."""
    _write_text_atomic(step_dir.parent / "latest", step_dir.name + "\n")


def publish(tmp: Path, keep_last: int = 0) -> Path:
    """Make a fully written and verified temporary checkpoint the latest one; apply retention."""
    root = tmp.parent
    final = root / tmp.name.removeprefix(".tmp-")
    _fsync_metadata(tmp)
    os.rename(tmp, final)
    _fsync(root)
    point_latest(final)
    if keep_last > 0:
        older = [p for p in list_checkpoints(root) if p.name < final.name]
        for old in older[: max(len(older) - (keep_last - 1), 0)]:
            # Rename first (atomic), so a crash never leaves a half-deleted step_* behind.
            trash = root / f".trash-{old.name}"
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    return final


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
    name = pointer.read_bytes().decode(errors="replace").strip()
    path = Path(root) / name
    if not name.startswith("step_") or "/" in name or not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint here")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint root (use its latest) or a step directory."""
    path = Path(path)
    if (path / "latest").is_file():
        return latest_checkpoint(path)
    if (path / "zarr.json").is_file():
        return path
    raise CheckpointError(f"{path}: neither a checkpoint directory nor a step directory")


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


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (root or step directory), without reading any array."""
    return metadata(open_checkpoint(resolve_checkpoint(path)))
