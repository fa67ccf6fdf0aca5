"""The chunk files of a checkpoint's arrays, read and written by a pool of threads: C-order
little-endian bytes followed by their CRC32C, in zarr's layout (`c/i/j`). A read touches only the
chunks its region needs and verifies every checksum (a missing file is an error, not zeros); a
write covers whole chunks (writers never share one); the caller fsyncs what was written.
"""

import ctypes
import itertools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr

from toolkit.checkpoint.arrays import (
    CheckpointError,
    StoredArray,
    dtype_name,
    from_numpy,
    open_array,
    to_numpy,
)


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


def run_all(fn: Callable, calls: list[tuple]) -> list:
    """fn(*args) for every args, on the chunk pool when there is more than one."""
    if len(calls) <= 1:
        return [fn(*args) for args in calls]
    return [f.result() for f in [_CHUNK_POOL.submit(fn, *args) for args in calls]]


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

    run_all(read_chunk, list(_boxes(arr, region)))
    return result if result is not None else from_numpy(out, arr.attrs["dtype"])


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

    return run_all(write_chunk, list(_boxes(arr, region)))


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
    run_all(fsync, [(p,) for p in paths])


def fsync(path: Path | str) -> None:
    """fsync a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
