"""A checkpoint is a Zarr v3 group per step: one array per tensor, JSON metadata, no pickle.

Layout of `<root>`:
    step_00000100/        a published checkpoint (zarr group)
        model/<param name>            e.g. model/layers.0.mixer.in_proj.weight
        optim/<param name>/exp_avg    Adam moments (fp32)
    latest                text file naming the newest published step directory
    .tmp-step_00000100    a checkpoint being written (ignored by readers, removed on retry)

Commit protocol: write everything into the temporary directory, read it back and compare, fsync,
rename it into place, then atomically replace `latest`. A crash at any point leaves the previous
checkpoint and pointer intact. Every chunk carries a CRC32C checksum.

bfloat16 (which zarr and numpy lack) is stored as its raw uint16 bits with the array attribute
`{"dtype": "bfloat16"}`: a plain numpy user reads it with
`torch.from_numpy(arr[...].view(np.int16)).view(torch.bfloat16)`, or `(arr[...].astype(np.uint32)
<< 16).view(np.float32)` without torch.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

FORMAT = "hybrid-toolkit-checkpoint"
FORMAT_VERSION = 1
MAX_CHUNK_BYTES = 256 * 2**20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the array or file."""


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def _from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """One chunk per array unless it is large; then split along dim 0."""
    if not shape:
        return ()
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = max(1, min(shape[0], MAX_CHUNK_BYTES // max(row_bytes, 1)))
    return (rows, *shape[1:])


def _write_array(group: zarr.Group, name: str, tensor: torch.Tensor) -> None:
    data, dtype = _to_numpy(tensor)
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=_chunks(data.shape, data.itemsize),
        compressors=[Crc32cCodec()],
        attributes={"dtype": dtype},
        # Write every chunk, zeros too: then a missing chunk file is an error, not silent zeros.
        config={"write_empty_chunks": True},
    )
    arr[...] = data


def _read_array(arr: zarr.Array, where: str) -> torch.Tensor:
    # zarr returns the fill value for a missing chunk; every chunk was written, so one missing
    # means a damaged checkpoint.
    if arr.nchunks_initialized != arr.nchunks:
        raise CheckpointError(
            f"{where}: array {arr.path!r} has {arr.nchunks - arr.nchunks_initialized} of "
            f"{arr.nchunks} chunk files missing"
        )
    try:
        data = arr[...]
    except Exception as e:  # the codec raises on a checksum mismatch
        raise CheckpointError(f"{where}: cannot read array {arr.path!r}: {e}") from e
    return _from_numpy(np.asarray(data), arr.attrs["dtype"])


def _fsync_tree(path: Path) -> None:
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


def save_checkpoint(
    root: str | Path,
    step: int,
    model: dict[str, torch.Tensor],
    optim: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write, verify and publish the checkpoint of `step`; returns its directory."""
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
        {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "metadata": metadata}
    )
    for prefix, tensors in (("model", model), ("optim", optim)):
        sub = group.create_group(prefix)
        for name, tensor in tensors.items():
            _write_array(sub, name, tensor)
    written = _read_group(tmp)
    for prefix, tensors in (("model", model), ("optim", optim)):
        for name, tensor in tensors.items():
            back = getattr(written, prefix)[name]
            same = back.dtype == tensor.dtype and back.shape == tensor.shape
            if (
                not same or _to_numpy(back)[0].tobytes() != _to_numpy(tensor)[0].tobytes()
            ):  # bits: NaN too
                raise CheckpointError(f"{tmp}: {prefix}/{name} did not read back identically")
    _fsync_tree(tmp)
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


def _read_group(path: Path) -> Checkpoint:
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint: {e}") from e
    if attrs.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} store (format={attrs.get('format')!r})")
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {attrs['format_version']} is newer than this toolkit's "
            f"{FORMAT_VERSION}; upgrade the toolkit"
        )
    parts = {}
    for prefix in ("model", "optim"):
        sub = group[prefix]
        parts[prefix] = {name: _read_array(arr, str(path)) for name, arr in sub.arrays()}
        for name, g in sub.groups():  # optimizer state is nested: optim/<param>/<moment>
            for moment, arr in g.arrays():
                parts[prefix][f"{name}/{moment}"] = _read_array(arr, str(path))
    return Checkpoint(path, parts["model"], parts["optim"], attrs.get("metadata", {}))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (root or step directory); checksums are verified on read."""
    return _read_group(resolve_checkpoint(path))
