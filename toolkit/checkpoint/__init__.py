"""Checkpoints: Zarr stores of global, layout-independent arrays (see store.py for the format,
arrays.py and chunks.py for the arrays and their chunk files, placement.py for how parameters map
onto arrays, sharded.py for who writes and reads what)."""

from toolkit.checkpoint.sharded import (
    CheckpointSaver,
    Comm,
    RankView,
    planned_writes,
    restore,
    restore_rng,
    snapshot,
    write_checkpoint,
)
from toolkit.checkpoint.store import (
    CheckpointError,
    ReadCounter,
    latest_checkpoint,
    list_checkpoints,
    read_metadata,
    resolve_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointSaver",
    "Comm",
    "RankView",
    "ReadCounter",
    "latest_checkpoint",
    "list_checkpoints",
    "planned_writes",
    "read_metadata",
    "resolve_checkpoint",
    "restore",
    "restore_rng",
    "snapshot",
    "write_checkpoint",
]
