"""JSONL -> indexed dataset: contents, worker-count independence, the CLI, bad lines."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.test_tokenizers import train_sentencepiece
from toolkit.data.indexed import IndexedDataset
from toolkit.data.preprocess import PreprocessError, preprocess
from toolkit.tokenizer import build_tokenizer

DOCS = [f"document {i}: " + "héllo wörld ✓ " * (i % 7) for i in range(300)]


def write_jsonl(path, docs, extra: dict[int, str] | None = None):
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    for at, line in sorted((extra or {}).items()):
        lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_documents_in_input_order_whatever_the_worker_count(tmp_path):
    sp = train_sentencepiece(tmp_path / "sp.model")
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS + [""])  # an empty document at the end
    one = preprocess(corpus, tmp_path / "one", tokenizer=str(sp), append_eod=True, progress=False)
    two = preprocess(
        corpus, tmp_path / "two", tokenizer=str(sp), workers=2, append_eod=True, progress=False
    )
    for ext in (".bin", ".idx"):
        a = (tmp_path / f"one_text_document{ext}").read_bytes()
        assert a == (tmp_path / f"two_text_document{ext}").read_bytes()
    tok = build_tokenizer(str(sp))
    ds = IndexedDataset(tmp_path / "one_text_document")
    assert ds.dtype == np.uint16 and len(ds) == 300 and ds.num_documents == 301
    for i in (0, 1, 150, 299):
        assert ds[i].tolist() == tok.encode(DOCS[i]) + [tok.eod]
    assert one.documents == two.documents == 301
    assert one.tokens == int(ds.sizes.sum()) == two.tokens


def test_a_bad_line_stops_with_its_number_unless_skipped(tmp_path):
    bad = {5: "{not json", 9: json.dumps({"title": "no text key"})}
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:20], bad)
    with pytest.raises(PreprocessError, match=r"c\.jsonl:6: not JSON.*--skip-bad-lines"):
        preprocess(corpus, tmp_path / "x", progress=False)
    summary = preprocess(corpus, tmp_path / "x", skip_bad_lines=True, progress=False)
    assert summary.bad_lines == 2 and summary.documents == 20
    assert IndexedDataset(tmp_path / "x_text_document")[5].tolist() == list(DOCS[5].encode())


def test_command_line(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:50], {3: json.dumps({"title": "x"})})
    cmd = [sys.executable, "-m", "toolkit.data.preprocess", "--input", str(corpus)]
    cmd += ["--json-key", "text", "--output-prefix", str(tmp_path / "data" / "c")]
    done = subprocess.run(cmd + ["--append-eod"], capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{corpus}:4: no string value for key 'text'" in done.stderr
    done = subprocess.run(
        cmd + ["--workers", "2", "--skip-bad-lines"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "c_text_document.bin/.idx: 50 documents" in done.stdout
    assert "1 bad lines skipped" in done.stdout and "tokens/s" in done.stdout
    assert "skipped" in done.stderr and ":4:" in done.stderr  # the warning names the line
    assert len(IndexedDataset(tmp_path / "data" / "c_text_document")) == 50
    bad_tok = subprocess.run(cmd + ["--tokenizer", "nope.model"], capture_output=True, text=True)
    assert bad_tok.returncode == 2 and "nope.model: no such file" in bad_tok.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "toolkit.data.preprocess", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--skip-bad-lines" in helped.stdout
