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

This module holds the format, the commit protocol and finding checkpoints; arrays.py the arrays'
metadata and chunks.py their chunk files; `toolkit.checkpoint.sharded` decides which rank writes
what.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import zarr

from toolkit.checkpoint.arrays import (
    GROUP_METADATA,
    ArraySpec,
    CheckpointError,
    StoredArray,
    array_keys,
    array_metadata,
    dtype_name,
    has,
    open_array,
    to_numpy,
)
from toolkit.checkpoint.chunks import (
    ReadCounter,
    can_read_into,
    fsync,
    fsync_files,
    read_region,
    run_all,
    write_region,
)

# The store is one module to its callers: the names of arrays.py and chunks.py they use are
# re-exported here, beside the store's own.
__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ArraySpec",
    "CheckpointError",
    "ReadCounter",
    "StoredArray",
    "array_keys",
    "begin",
    "can_read_into",
    "create_arrays",
    "dtype_name",
    "fsync_files",
    "has",
    "latest_checkpoint",
    "list_checkpoints",
    "metadata",
    "open_array",
    "open_checkpoint",
    "point_latest",
    "publish",
    "read_metadata",
    "read_region",
    "resolve_checkpoint",
    "step_dirname",
    "to_numpy",
    "write_region",
]

FORMAT = "hybrid-toolkit-checkpoint"
FORMAT_VERSION = 2  # 2: packed weights split into components, vocabulary rows unpadded


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


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
    run_all(_write_node, [(tmp / key, doc) for key, doc in documents.items()])


def _write_node(directory: Path, document: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "zarr.json").write_text(json.dumps(document, indent=2))


def _fsync_metadata(path: Path) -> None:
    """fsync every zarr.json and directory under `path` (writers fsync their chunk files), in
    parallel: one by one, thousands of them took seconds."""
    paths = []
    for dirpath, _, files in os.walk(path):
        paths += [(os.path.join(dirpath, "zarr.json"),)] if "zarr.json" in files else []
        paths.append((dirpath,))
    run_all(fsync, paths)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


def point_latest(step_dir: Path) -> None:
    """Atomically make `latest` (beside the step directory) name it."""
    _write_text_atomic(step_dir.parent / "latest", step_dir.name + "\n")


def publish(tmp: Path, keep_last: int = 0) -> Path:
    """Make a fully written and verified temporary checkpoint the latest one; apply retention."""
    root = tmp.parent
    final = root / tmp.name.removeprefix(".tmp-")
    _fsync_metadata(tmp)
    os.rename(tmp, final)
    fsync(root)
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


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (root or step directory), without reading any array."""
    return metadata(open_checkpoint(resolve_checkpoint(path)))
