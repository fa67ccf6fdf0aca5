"""Whole checkpoints of arbitrary tensors, for the store's tests: written through the real writer
(`sharded.write_checkpoint`, as one rank) and read back array by array through the store's real
reader (`store.read_region`, every checksum verified), with no model or layout in between."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.checkpoint import Comm, ReadCounter, placement, store, write_checkpoint


@dataclass
class Checkpoint:
    """A checkpoint read whole: tensors by array name."""

    path: Path
    model: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: dict[str, torch.Tensor],
    optim: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write and publish whole tensors (optimizer keys '<array>/<state>'), each one array chunked
    along dim 0 when large; returns the step directory."""
    tensors = {f"model/{k}": v for k, v in model.items()} | {
        f"optim/{k}": v for k, v in optim.items()
    }
    writes = []
    for key, t in tensors.items():
        chunks = placement.chunk_shape(tuple(t.shape), None, 0, t.element_size())
        spec = store.ArraySpec(key, tuple(t.shape), store.dtype_name(t.dtype), chunks)
        writes.append((spec, (), t))
    return write_checkpoint(root, step, writes, metadata, Comm(), keep_last)


def load_checkpoint(path: str | Path, counter: ReadCounter | None = None) -> Checkpoint:
    """Read a whole checkpoint (root or step directory); checksums are verified on read."""
    path = store.resolve_checkpoint(path)
    group = store.open_checkpoint(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for prefix in ("model", "optim"):
        parts[prefix] = {
            key.removeprefix(prefix + "/"): store.read_region(
                store.open_array(group, key), (), str(path), counter
            )
            for key in store.array_keys(group, prefix)
        }
    return Checkpoint(path, parts["model"], parts["optim"], store.metadata(group))
