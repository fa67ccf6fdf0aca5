"""benchmarks/train_throughput.py on the CPU: the tiny recipe for 2 timed steps, its JSON fields."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "train_throughput", ROOT / "benchmarks/train_throughput.py"
)
train_throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_throughput)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        train_throughput.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--steps" in out and "--mbs" in out and "MFU" in out


def test_tiny_recipe_on_cpu(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--steps", "2", "--warmup", "1", "--seq", "64"]
    args += ["--mbs", "2", "--set", 'train.activation_checkpointing=["mlp"]', "--json", str(out)]
    assert train_throughput.main(args) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["seq"] == 64 and r["mbs"] == 2 and r["steps"] == 2
    assert len(r["step_times_s"]) == 2 and len(r["warmup_times_s"]) == 1 and len(r["losses"]) == 3
    assert r["step_time_s"] > 0 and all(math.isfinite(x) for x in r["losses"])
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["step_time_s"])
    assert r["tflops_per_gpu"] == pytest.approx(
        r["flops_per_token"] * 128 / r["step_time_s"] / 1e12
    )
    assert r["mfu"] is None and r["datasheet_bf16_tflops"] is None  # no data-sheet peak on CPUs
    assert r["measured_matmul_tflops"]["bf16"] > 0 and 0 < r["mfu_of_measured_bf16"]
    assert r["peak_memory_gb"] > 0 and r["versions"]["torch"]
    assert r["activation_checkpointing"] == ["mlp"] and r["compile"] is False
    assert r["precision"] == "fp32" and r["fp8_engine"] is None
    assert "tokens/s" in capsys.readouterr().out


def test_fp8_on_cpu_is_an_error_in_the_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--steps", "1", "--seq", "32", "--mbs", "1"]
    args += ["--set", 'train.precision="fp8"', "--json", str(out)]
    assert train_throughput.main(args) == 1
    assert "train.precision='fp8'" in json.loads(out.read_text())["error"]
    assert "train.precision='fp8'" in capsys.readouterr().err


def test_bad_recipe_key_exits_2(capsys):
    args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--set", 'train.activation_checkpointing="x"']
    assert train_throughput.main(args) == 2
    assert "train.activation_checkpointing" in capsys.readouterr().err
