"""toolkit.data.train_tokenizer: a byte-level BPE trained here on a small real corpus (Python's
own standard library sources), then used as any tokenizer.json: encode/decode, preprocess,
training steps."""

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from toolkit.config import recipe_from_dict
from toolkit.data.indexed import IndexedDataset
from toolkit.tokenizer import HFTokenizer, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path, texts


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok.json"
    proc = cli(
        "toolkit.data.train_tokenizer",
        *("--input", str(corpus[0]), "--json-key", "text", "--vocab-size", "700"),
        *("--output", str(out)),
    )
    assert proc.returncode == 0, proc.stderr
    assert "700 tokens" in proc.stdout and "30 documents" in proc.stdout
    assert "read" in proc.stderr  # progress
    return out


def test_encode_decode_round_trip(tok):
    t = build_tokenizer(str(tok))
    assert isinstance(t, HFTokenizer) and t.vocab_size == 700
    assert t.token_string(t.eod) == "<|endoftext|>" and t.bos == t.pad == t.eod
    for text in [
        "def f(x):\n    return x  # ok\r\n",
        "  leading and trailing spaces  ",
        "Grüße, 東京, emoji 🐍🚀, tab\tand NUL \x00 and \u200b",
        "",
    ]:
        ids = t.encode(text)
        assert max(ids, default=0) < t.vocab_size and t.decode(ids) == text
    # It learned the corpus: Python source compresses well below one token per byte.
    sample = (Path(sysconfig.get_paths()["stdlib"]) / "typing.py").read_text()
    assert len(t.encode(sample)) < 0.5 * len(sample.encode())


def test_preprocess_and_train_with_it(tok, corpus, tmp_path):
    path, texts = corpus
    prefix = tmp_path / "data" / "corpus"
    proc = cli(
        "toolkit.data.preprocess",
        *("--input", str(path), "--json-key", "text", "--tokenizer", str(tok)),
        *("--output-prefix", str(prefix), "--append-eod", "--no-progress"),
    )
    assert proc.returncode == 0, proc.stderr
    data = IndexedDataset(f"{prefix}_text_document")
    t = build_tokenizer(str(tok))
    assert len(data) == len(texts)
    for i in (0, len(texts) - 1):
        ids = data[i].tolist()
        assert ids[-1] == t.eod and t.decode(ids[:-1]) == texts[i]
    from toolkit.train import train  # torch: only for this test

    recipe = recipe_from_dict(
        {
            "model": {"num_layers": 2, "hidden_size": 64, "seq_length": 64, "pattern": "M*",
                      "num_attention_heads": 2, "num_query_groups": 1, "mamba_state_dim": 16,
                      "mamba_head_dim": 16, "mamba_num_groups": 1, "mamba_chunk_size": 16},
            "data": {"tokenizer": str(tok), "blend": [f"{prefix}_text_document"],
                     "split": "90,10,0"},
            "train": {"steps": 3, "micro_batch_size": 2, "global_batch_size": 2,
                      "precision": "fp32", "device": "cpu", "lr": 1e-3},
            "checkpoint": {"enabled": False},
            "logging": {"dir": str(tmp_path / "tb"), "progress_bar": False},
        }
    )  # fmt: skip
    result = train(recipe)
    assert sorted(result.losses) == [1, 2, 3]
    # The output layer spans the tokenizer's 700 tokens: the first loss is near ln(700).
    assert all(math.isfinite(v) for v in result.losses.values())
    assert abs(result.losses[1] - math.log(700)) < 1.0


@pytest.mark.parametrize(
    "lines, args, named",
    [
        ('{"text": "a"}\nnot json\n', [], "corpus.jsonl:2: not a JSON line"),
        ('{"text": "a"}\n{"body": "b"}\n', [], "corpus.jsonl:2: no string value for key 'text'"),
        ('{"text": "a"}\n', ["--vocab-size", "100"], "--vocab-size 100: must be in [257"),
        ("\n", [], "no documents"),
        (None, [], "no such input file"),
        ('{"text": "a"}\n', ["--output", "/nonexistent/dir/tok.json"], "--output"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, lines, args, named):
    src = tmp_path / "corpus.jsonl"
    if lines is not None:
        src.write_text(lines)
    out = tmp_path / "tok.json"
    flags = {"--input": str(src), "--vocab-size": "300", "--output": str(out)}
    flags.update(zip(args[0::2], args[1::2], strict=True))
    proc = cli("toolkit.data.train_tokenizer", "--no-progress", *sum(flags.items(), ()))
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == (["corpus.jsonl"] if lines else [])


def test_help():
    proc = cli("toolkit.data.train_tokenizer", "--help")
    assert proc.returncode == 0 and "--vocab-size" in proc.stdout
