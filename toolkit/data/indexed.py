"""The reference framework's memory-mapped indexed dataset: `<prefix>.bin` holds the tokens of
every sequence back to back; `<prefix>.idx` describes them:

    magic b"MMIDIDX\\x00\\x00" | version <Q = 1 | dtype code <B | sequence count <Q |
    document count <Q | sizes int32[sequences] | pointers int64[sequences] (byte offsets into
    .bin) | document index int64[documents] (0, then the sequence count after each document)

Files written by the reference's preprocessing tool read here and the other way round. Reading
maps both files (np.memmap): opening a multi-GB dataset costs no memory.
"""

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# The reference's dtype codes (megatron.core.datasets.indexed_dataset.DType).
DTYPES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
HEADER = struct.Struct("<9sQBQQ")


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing or malformed: the message names the file and the problem."""


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """The reference's choice: uint16 while every id fits (with its margin), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDataset:
    """Read-only view of `<prefix>.bin/.idx`; `ds[i]` is sequence i as a (memory-mapped) array."""

    def __init__(self, prefix: str | Path) -> None:
        self.bin_path, self.idx_path = paths(prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise IndexedDatasetError(f"{p}: no such file (dataset prefix {prefix})")
        idx_bytes = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size or not head.startswith(MAGIC):
            raise IndexedDatasetError(
                f"{self.idx_path}: not an indexed dataset index (magic {head[:9]!r}, "
                f"expected {MAGIC!r})"
            )
        _, version, code, n_seq, n_doc = HEADER.unpack(head)
        if version != VERSION:
            raise IndexedDatasetError(
                f"{self.idx_path}: index version {version} is not supported (only {VERSION})"
            )
        if code not in DTYPES:
            raise IndexedDatasetError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        expected = HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if idx_bytes < expected:
            raise IndexedDatasetError(
                f"{self.idx_path}: truncated: {idx_bytes} bytes, the header announces {n_seq} "
                f"sequences and {n_doc} document entries ({expected} bytes)"
            )
        offset = HEADER.size
        self.sizes = np.memmap(self.idx_path, np.int32, "r", offset, (n_seq,))
        offset += 4 * n_seq
        self.pointers = np.memmap(self.idx_path, np.int64, "r", offset, (n_seq,))
        offset += 8 * n_seq
        self.document_indices = np.memmap(self.idx_path, np.int64, "r", offset, (n_doc,))
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n_seq else 0
        have = self.bin_path.stat().st_size
        if have < need:
            raise IndexedDatasetError(
                f"{self.bin_path}: truncated: {have} bytes, its index {self.idx_path.name} "
                f"needs {need}"
            )
        # np.memmap refuses an empty file; an empty dataset has nothing to map.
        self.tokens = np.memmap(self.bin_path, self.dtype, "r") if have else np.empty(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens offset .. offset+length of sequence i, without touching the rest of it."""
        size = int(self.sizes[i])
        length = size - offset if length is None else length
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self.tokens[start : start + length]


class IndexedDatasetWriter:
    """Streams sequences to `<prefix>.bin` and writes `<prefix>.idx` at `close()`.

    One JSON document usually makes one sequence; `end_document()` closes a document (the
    reference's builder does the same, so empty documents repeat the previous index entry).
    """

    def __init__(self, prefix: str | Path, dtype: type[np.number] | np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} has no code in the indexed format")
        self.bin_path, self.idx_path = paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin: BinaryIO = open(self.bin_path, "wb")  # noqa: SIM115 - closed in close()
        self.sizes: list[int] = []
        self.document_indices: list[int] = [0]

    def add_sequence(self, tokens: np.ndarray | list[int]) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(array.tobytes(order="C"))
        self.sizes.append(len(array))

    def add_document(
        self, tokens: np.ndarray | list[int], lengths: list[int] | None = None
    ) -> None:
        """A document of one sequence, or of several whose `lengths` split `tokens`. An empty
        document has no sequence (as in the reference)."""
        array = np.asarray(tokens, dtype=self.dtype)
        if lengths is None:
            lengths = [len(array)] if len(array) else []
        start = 0
        for n in lengths:
            self.add_sequence(array[start : start + n])
            start += n
        self.end_document()

    def end_document(self) -> None:
        self.document_indices.append(len(self.sizes))

    def close(self) -> None:
        self._bin.close()
        write_index(self.idx_path, self.dtype, self.sizes, self.document_indices)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_index(path: Path, dtype: np.dtype, sizes: list[int], document_indices: list[int]) -> None:
    sizes_array = np.asarray(sizes, dtype=np.int32)
    # Pointers are byte offsets: the running sum of the previous sequences' bytes.
    pointers = np.zeros(len(sizes_array), dtype=np.int64)
    if len(sizes_array) > 1:
        np.cumsum(sizes_array[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, CODES[dtype], len(sizes_array), len(docs)))
        f.write(sizes_array.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(docs.tobytes(order="C"))
