"""The reference's .bin/.idx format, byte for byte, in both directions: files built here from the
format description (not with our writer) read with our reader, and our writer's files equal them."""

import struct

import numpy as np
import pytest

from toolkit.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter

# Documents as lists of sequences (one sequence per document unless split into sentences); the
# third document is empty (the reference writes no sequence for it but still ends a document).
DOCS = [[[5, 6, 7, 2]], [[1, 2], [3, 4, 9]], [], [[60000, 8, 2]]]


def reference_files(prefix, dtype, code: int, docs=DOCS) -> tuple[bytes, bytes]:
    """The .bin and .idx bytes the reference's builder writes for `docs`, from the format spec:
    magic, <Q version 1, <B dtype code, <Q sequence count, <Q document count, int32 sizes,
    int64 byte pointers, int64 document index (0, then the sequence count after each document)."""
    sequences = [s for d in docs for s in d]
    itemsize = np.dtype(dtype).itemsize
    bin_bytes = b"".join(np.asarray(s, dtype=dtype).tobytes() for s in sequences)
    pointers, offset = [], 0
    for s in sequences:
        pointers.append(offset)
        offset += len(s) * itemsize
    doc_index, n = [0], 0
    for d in docs:
        n += len(d)
        doc_index.append(n)
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(doc_index))
    idx += struct.pack(f"<{len(sequences)}i", *(len(s) for s in sequences))
    idx += struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_index)}q", *doc_index)
    (prefix.parent / (prefix.name + ".bin")).write_bytes(bin_bytes)
    (prefix.parent / (prefix.name + ".idx")).write_bytes(idx)
    return bin_bytes, idx


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4), (np.int64, 5)])
def test_our_writer_matches_the_reference_bytes(tmp_path, dtype, code):
    ref_bin, ref_idx = reference_files(tmp_path / "ref", dtype, code)
    with IndexedDatasetWriter(tmp_path / "ours", dtype) as w:
        for doc in DOCS:
            w.add_document([t for s in doc for t in s], [len(s) for s in doc])
    assert (tmp_path / "ours.bin").read_bytes() == ref_bin
    assert (tmp_path / "ours.idx").read_bytes() == ref_idx


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4), (np.int64, 5)])
def test_our_reader_reads_reference_files(tmp_path, dtype, code):
    reference_files(tmp_path / "ref", dtype, code)
    ds = IndexedDataset(tmp_path / "ref")
    sequences = [s for d in DOCS for s in d]
    assert len(ds) == len(sequences) and ds.num_documents == len(DOCS)
    assert ds.dtype == np.dtype(dtype)
    assert [ds[i].tolist() for i in range(len(ds))] == sequences
    assert ds.document_indices.tolist() == [0, 1, 3, 3, 4]
    assert ds.get(2, 1, 2).tolist() == [4, 9]  # a piece of one sequence
    assert isinstance(ds.tokens, np.memmap) and isinstance(ds.sizes, np.memmap)  # nothing loaded


def test_bad_files_give_errors_naming_the_file(tmp_path):
    reference_files(tmp_path / "d", np.uint16, 8)
    idx, bin_ = tmp_path / "d.idx", tmp_path / "d.bin"
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()

    bin_.write_bytes(good_bin[:-3])
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: truncated: 21 bytes.*needs 24"):
        IndexedDataset(tmp_path / "d")
    bin_.write_bytes(good_bin)

    idx.write_bytes(b"NOTANIDX\x00" + good_idx[9:])
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: not an indexed dataset.*magic"):
        IndexedDataset(tmp_path / "d")
    idx.write_bytes(good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:])
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: index version 2 is not supported"):
        IndexedDataset(tmp_path / "d")
    idx.write_bytes(good_idx[:-8])
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: truncated"):
        IndexedDataset(tmp_path / "d")

    with pytest.raises(IndexedDatasetError, match=r"missing\.idx: no such file"):
        IndexedDataset(tmp_path / "missing")
    idx.write_bytes(good_idx)
    bin_.unlink()
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: no such file"):
        IndexedDataset(tmp_path / "d")
