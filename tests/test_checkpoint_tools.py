"""checkpoints_tools/inspect_checkpoint.py and reshard.py, run as users run them (subprocesses)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.build import build_model, model_from_checkpoint, save_model_checkpoint
from toolkit.checkpoint import store
from toolkit.config import load_recipe
from toolkit.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"checkpoints_tools/{name}.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    recipe = load_recipe(ROOT / "recipes/tiny_hybrid.toml")
    torch.manual_seed(0)
    model = build_model(recipe, build_tokenizer("byte"))
    return save_model_checkpoint(tmp_path_factory.mktemp("ckpt"), model, recipe, step=7)


def test_inspect_lists_arrays_and_metadata(checkpoint):
    proc = tool("inspect_checkpoint", checkpoint.parent)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "step         7" in out and "MM-*M-" in out and "(vocabulary 259)" in out
    assert re.search(
        r"model/layers.0.mixer.in_proj.weight.x +\(384, 192\) +float32 +288.0 KiB", out
    )
    assert "model/embedding.weight" in out and "(259, 192)" in out
    assert "model      63 arrays" in out


@pytest.mark.long  # make test-long (CI runs it): 9 s
def test_inspect_verify_names_a_damaged_array(tmp_path, checkpoint):
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    assert tool("inspect_checkpoint", copy, "--verify").returncode == 0
    chunk = next((copy / "model" / "final_norm.weight" / "c").rglob("*"))
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    proc = tool("inspect_checkpoint", copy, "--verify")
    assert proc.returncode == 1
    assert "1 damaged array" in proc.stderr and "'model/final_norm.weight'" in proc.stderr
    missing = next((copy / "model" / "layers.1.norm.weight" / "c").rglob("*"))
    missing.unlink()
    proc = tool("inspect_checkpoint", copy, "--verify")
    assert "2 damaged array" in proc.stderr and "chunk file c/0 is missing" in proc.stderr


def test_inspect_rejects_what_is_not_a_checkpoint(tmp_path):
    # bad input: 2 (a damaged checkpoint fails --verify: 1)
    proc = tool("inspect_checkpoint", tmp_path)
    assert proc.returncode == 2 and "neither a checkpoint directory" in proc.stderr


@pytest.mark.parametrize("tp", [2, 3])
def test_reshard_rechunks_for_the_target_and_keeps_every_value(tmp_path, checkpoint, tp):
    proc = tool("reshard", "--in", checkpoint, "--out", tmp_path / "out", "--tp", tp, "--pp", 2)
    if tp == 3:  # 12 Mamba heads split, but 4 attention heads do not: bad input, nothing written
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == (
            f"error: --tp 3 --pp 2 do not fit the model of {checkpoint}: parallel.tp: 4 attention "
            "heads are not divisible by TP=3\n"
        )
        assert not (tmp_path / "out").exists()
        return
    assert proc.returncode == 0, proc.stderr
    assert "for TP=2 PP=2: 63 arrays" in proc.stdout
    out = store.resolve_checkpoint(tmp_path / "out")
    group = store.open_checkpoint(out)
    assert group["model/layers.0.mixer.in_proj.weight.x"].chunks == (192, 192)  # 384 / TP
    assert group["model/layers.0.mixer.out_proj.weight"].chunks == (192, 192)  # columns
    assert store.metadata(group)["layout"]["tp"] == 2
    assert store.metadata(group)["recipe"]["parallel"]["pp"] == 2
    a, _, _ = model_from_checkpoint(checkpoint)
    b, _, _ = model_from_checkpoint(out)
    assert b.padded_vocab_size == 512  # padded for TP=2 now: padding is not stored
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p[:259], q[:259]), name


def test_reshard_refuses_an_output_that_holds_the_step(tmp_path, checkpoint):
    proc = tool("reshard", "--in", checkpoint, "--out", checkpoint.parent)
    assert proc.returncode == 2
    assert f"--out {checkpoint.parent} already holds {checkpoint.name}" in proc.stderr


@pytest.mark.long  # make test-long (CI runs it): 33 s
def test_reshard_writes_megatron_files_of_either_generation(tmp_path, checkpoint):
    """--format megatron writes 2024-era keys by default (a Mamba layer's own norm.weight) and
    current ones on request (fused into in_proj, conv1d_weight); attention and MLP pre-norms
    are fused in both, and import_megatron.py reads each back to the same weights."""
    from toolkit.checkpoint.megatron import load_rank_file

    a, _, _ = model_from_checkpoint(checkpoint)  # pattern MM-*M-
    for generation, tp, pp in (("2024", 1, 1), ("current", 2, 2)):
        flags = [] if generation == "2024" else ["--megatron-generation", generation]
        mg = tmp_path / generation
        argv = ["--in", checkpoint, "--out", mg, "--tp", tp, "--pp", pp, "--format", "megatron"]
        proc = tool("reshard", *argv, *flags)
        assert proc.returncode == 0, proc.stderr
        assert f"({generation} keys) at TP={tp} PP={pp}" in proc.stdout
        first = next(mg.glob(f"iter_*/mp_rank_00{'_000' if pp > 1 else ''}/model_optim_rng.pt"))
        keys = set(load_rank_file(first)["model"])
        mamba = {"2024": "norm.weight", "current": "mixer.in_proj.layer_norm_weight"}
        assert f"decoder.layers.0.{mamba[generation]}" in keys
        assert ("decoder.layers.0.mixer.conv1d_weight" in keys) == (generation == "current")
        assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in keys
        assert "decoder.layers.2.norm.weight" not in keys
        proc = tool("import_megatron", "--in", mg, "--out", tmp_path / f"back-{generation}")
        assert proc.returncode == 0, proc.stderr
        b, _, _ = model_from_checkpoint(tmp_path / f"back-{generation}")
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p[:259], q[:259]), (generation, name)
    proc = tool(
        "reshard", "--in", checkpoint, "--out", tmp_path / "z", "--megatron-generation", "current"
    )
    assert proc.returncode == 2 and "needs --format megatron" in proc.stderr
    assert not (tmp_path / "z").exists()
