"""The small-scale study's recipes (recipes/study/*.toml) and its corpus command
(benchmarks/study_corpus.py): equal size, tokenizer, corpus and token budget."""

import json
import math
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from toolkit.config import load_recipe
from toolkit.data.indexed import IndexedDataset
from toolkit.layout import build_layout
from toolkit.model import HybridLM, count_parameters

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("mamba2", "transformer", "hybrid")


def test_the_three_recipes_compare_like_with_like():
    recipes = {n: load_recipe(ROOT / "recipes" / "study" / f"{n}.toml") for n in NAMES}
    sizes = {}
    for name, r in recipes.items():
        with torch.device("meta"):
            sizes[name] = count_parameters(HybridLM(r.model, vocab_size=16384))["total"]
    assert all(100e6 <= s <= 150e6 for s in sizes.values()), sizes
    assert max(sizes.values()) / min(sizes.values()) < 1.05, sizes
    same = [
        (r.data.tokenizer, r.data.blend, r.data.split, r.model.seq_length, r.train.steps,
         r.train.global_batch_size, r.train.lr, r.train.eval_interval, r.train.seed)
        for r in recipes.values()
    ]  # fmt: skip
    assert same[0] == same[1] == same[2]
    patterns = {}
    for name, r in recipes.items():
        m = r.model
        patterns[name] = build_layout(m.num_layers, m.att_ratio, m.mlp_ratio, m.pattern).pattern
    assert set(patterns["mamba2"]) == {"M"}
    assert patterns["transformer"] == "*-" * 14
    t = recipes["transformer"].model
    assert (t.position_embedding, t.rotary_percent, t.mlp_activation, t.norm) == (
        "rope", 0.5, "relu2", "layernorm",
    )  # fmt: skip
    hybrid = patterns["hybrid"]
    assert 0.05 < hybrid.count("*") / len(hybrid) < 0.11  # the paper's ~8% attention
    assert 0.45 < hybrid.count("-") / len(hybrid) < 0.55  # and ~50% MLP


def test_corpus_command(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    for i in range(6):
        (docs / "sub" / f"page{i}.txt").write_text(f"Chapter {i}. The quick brown fox. " * 200)
    (docs / "image.png").write_bytes(b"\x89PNG")  # not text: left out
    out = tmp_path / "study"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "study_corpus.py"), "--out", str(out)]
    args = ["--no-stdlib", "--docs", str(docs), "--vocab-size", "300", "--workers", "1"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == 6 and manifest["sources"][f"docs:{docs}"]["files"] == 6
    assert 256 < manifest["vocab_size"] <= 300 and manifest["tokens"] > 0
    assert len(IndexedDataset(str(out / "corpus_text_document"))) == 6
    bad = subprocess.run([*cmd, "--docs", str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--docs" in bad.stderr
    bad = subprocess.run([*cmd, "--package", "no_such_pkg"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--package no_such_pkg" in bad.stderr


def test_corpus_takes_an_installed_package(tmp_path):
    import iniconfig  # a small pure-Python package that pytest brings

    files = sorted(Path(iniconfig.__file__).parent.rglob("*.py"))
    out = tmp_path / "study"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "study_corpus.py"), "--out", str(out)]
    args = ["--no-stdlib", "--package", "iniconfig", "--vocab-size", "300", "--workers", "1"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"]["package:iniconfig"]["files"] == len(
        [f for f in files if f.read_text().strip()]
    )
    assert manifest["package_versions"] == {"iniconfig": metadata.version("iniconfig")}


@pytest.mark.long  # make test-long (CI runs it): a real training run and decode.py
def test_report_reads_a_real_run(tmp_path):
    """benchmarks/study_report.py on what a real (tiny, CPU) training run and decode.py wrote."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "hybrid.toml").write_text((ROOT / "recipes" / "tiny_hybrid.toml").read_text())
    run = tmp_path / "out" / "hybrid"
    train = [sys.executable, "-m", "toolkit.train", str(recipes / "hybrid.toml")]
    sets = ["train.steps=4", "train.eval_interval=2", "train.eval_batches=1", "data.valid_fraction=0.05",
            "logging.interval=1", f'logging.dir="{run / "tensorboard"}"',
            f'checkpoint.dir="{tmp_path / "ckpt"}"', 'train.device="cpu"']  # fmt: skip
    proc = subprocess.run(
        [*train, *(a for s in sets for a in ("--set", s))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    decode = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--recipe"]
    decode += [str(recipes / "hybrid.toml"), "--contexts", "32,64", "--batches", "1"]
    decode += ["--steps", "2", "--warmup", "1", "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.run(
        [*decode, "--json", str(run / "decode.json")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = [sys.executable, str(ROOT / "benchmarks" / "study_report.py")]
    png, summary = tmp_path / "study.png", tmp_path / "study.json"
    args = [str(tmp_path / "out"), "--recipes", str(recipes), "--png", str(png)]
    proc = subprocess.run(
        [*report, *args, "--json", str(summary)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(summary.read_text())["hybrid"]
    tiny = load_recipe(recipes / "hybrid.toml")
    per_step = tiny.train.global_batch_size * tiny.model.seq_length
    assert row["steps"] == 4 and row["tokens"] == 4 * per_step
    assert [t for t, _ in row["valid_curve"]] == [2 * per_step, 4 * per_step]
    assert row["valid_perplexity"] == pytest.approx(math.exp(row["valid_loss"]))
    assert set(row["decode_tokens_per_s"]) == {"32x1", "64x1"}
    assert "| Hybrid |" in proc.stdout and png.read_bytes()[:4] == b"\x89PNG"
    empty = subprocess.run([*report, str(tmp_path / "nothing")], capture_output=True, text=True)
    assert empty.returncode == 2 and "no NAME/tensorboard" in empty.stderr
