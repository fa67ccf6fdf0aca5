"""launchers/submit.py --data/--tokenizer (shorthands for data.blend and data.tokenizer) and the
warning that the embedded corpus is a smoke test."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.build import build_data
from toolkit.config import load_recipe
from toolkit.data.flags import parse_blend
from toolkit.data.preprocess import preprocess
from toolkit.data.train_tokenizer import train_tokenizer
from toolkit.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = [sys.executable, str(ROOT / "launchers" / "submit.py")]
SMOKE = "the embedded corpus"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, Path]:
    """A real indexed dataset (PREFIX, the .bin/.idx prefix) and the tokenizer.json it was
    tokenized with, both made here from the project's own source files."""
    tmp = tmp_path_factory.mktemp("data")
    docs = sorted((ROOT / "toolkit").rglob("*.py"))[:40]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p.read_text()}) + "\n" for p in docs))
    tok = tmp / "tok.json"
    train_tokenizer(corpus, tok, vocab_size=400, progress=False)
    preprocess(corpus, tmp / "code", tokenizer=str(tok), append_eod=True, progress=False)
    return str(tmp / "code_text_document"), tok


@pytest.mark.parametrize(
    "text, blend",
    [
        ("data/a_text_document", ["data/a_text_document"]),
        ("a,b", ["a", "b"]),
        ("0.7,a,0.3,b", [[0.7, "a"], [0.3, "b"]]),
        ("0.7 a 0.3 b", [[0.7, "a"], [0.3, "b"]]),  # the reference's --data-path spelling
    ],
)
def test_parse_blend(text, blend):
    assert parse_blend(text) == blend


@pytest.mark.parametrize("text", ["", "0.7,a,b", "a,0.3", "0.5,0.5", "-1,a"])
def test_parse_blend_refuses(text):
    with pytest.raises(ValueError, match="--data"):
        parse_blend(text)


def run_submit(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*SUBMIT, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_slurm_script_carries_the_shorthands(data):
    prefix, tok = data
    proc = run_submit(
        "recipes/tiny_hybrid.toml", "--data", f"0.7,{prefix},0.3,{prefix}", "--tokenizer",
        str(tok), "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f'--set \'data.blend=[[0.7, "{prefix}"], [0.3, "{prefix}"]]\'' in proc.stdout
    assert f"--set 'data.tokenizer=\"{tok}\"'" in proc.stdout


def test_local_run_trains_on_the_data(data, tmp_path):
    prefix, tok = data
    proc = run_submit(
        "recipes/tiny_hybrid.toml", "--local", "--data", prefix, "--tokenizer", str(tok),
        *("--set", "train.steps=2", "--set", "train.micro_batch_size=2"),
        *("--set", "train.global_batch_size=2", "--set", 'train.sample_prompt=""'),
        *("--set", "checkpoint.enabled=false", "--set", "logging.progress_bar=false"),
        *("--set", f'logging.dir="{tmp_path / "tb"}"', "--set", 'data.split="100,0,0"'),
        # not the recipe's runs/tiny_hybrid/checkpoints, which `make demo` fills (byte vocabulary)
        *("--set", f'checkpoint.dir="{tmp_path / "ckpt"}"'),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"data: {prefix}" in proc.stderr and "step 2/2 loss" in proc.stderr
    assert "vocab 400" in proc.stderr  # the model's vocabulary is the tokenizer's
    assert SMOKE not in proc.stderr


@pytest.mark.parametrize(
    "args, named",
    [
        (["--data", "data/none_text_document"], "--data: data/none_text_document.bin: no such"),
        (["--data", "0.5,a,b"], "--data 0.5,a,b: mixes weights and prefixes"),
        (["--tokenizer", "nonexistent.json"], "--tokenizer nonexistent.json: no such file"),
    ],
)
def test_bad_shorthands_exit_2(args, named, tmp_path):
    proc = run_submit(str(ROOT / "recipes/tiny_hybrid.toml"), "--local", *args, cwd=tmp_path)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["800m_hybrid", "8b_hybrid"])
def test_the_embedded_corpus_is_logged_as_a_smoke_test(name, data, caplog):
    recipe = load_recipe(ROOT / "recipes" / f"{name}.toml", ["data.max_corpus_bytes=100000"])
    with caplog.at_level(logging.WARNING, logger="toolkit.build"):
        build_data(recipe, ByteTokenizer())
    assert any(
        SMOKE in r.getMessage() and "--data PREFIX" in r.getMessage() for r in caplog.records
    )
    caplog.clear()
    real = load_recipe(
        ROOT / "recipes" / f"{name}.toml", [f'data.blend=["{data[0]}"]', 'data.split="100,0,0"']
    )
    with caplog.at_level(logging.WARNING, logger="toolkit.build"):
        build_data(real, ByteTokenizer())
    assert not [r for r in caplog.records if SMOKE in r.getMessage()]
