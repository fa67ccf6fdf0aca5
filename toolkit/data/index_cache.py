"""Index arrays cached as .npy files: built once, by whichever process gets there first, then
memory-mapped by every later run (and every rank). Files are published with an atomic rename,
so a reader never sees half of one."""

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("toolkit.data")

CACHE_VERSION = 1  # bump when the way an index is built changes: old files are then ignored


def cache_key(**description: Any) -> str:
    """A short, stable name for everything an index depends on."""
    text = json.dumps({"version": CACHE_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class IndexCache:
    """Arrays under `directory`, by name. An unwritable directory keeps arrays in memory only
    (with one warning) rather than stopping a run whose data lies on a read-only mount."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.built: list[str] = []  # what this process built (the rest was read)
        self._writable: bool | None = None

    def get(self, name: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.directory / f"{name}.npy"
        if path.is_file():
            return np.load(path, mmap_mode="r")
        array = build()
        self.built.append(name)
        if self._can_write():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, array)
            os.replace(tmp, path)
        return array

    def _can_write(self) -> bool:
        if self._writable is None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._writable = os.access(self.directory, os.W_OK)
            except OSError:
                self._writable = False
            if not self._writable:
                log.warning(
                    "cannot write index files to %s: building them in memory each run "
                    "(set data.cache_dir to a writable directory)",
                    self.directory,
                )
        return self._writable
