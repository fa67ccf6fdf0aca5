"""What a run shows: TensorBoard scalars and text read back with TensorBoard's own reader, MFU,
a torch.profiler trace of chosen steps, NVTX ranges around blocks, and the PNG report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import tiny_model_config
from tests.test_train import RANDOM_TEXT, make_recipe
from toolkit.model import HybridLM
from toolkit.optim import learning_rate
from toolkit.profiling import add_nvtx_ranges
from toolkit.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    recipe = make_recipe(tmp, RANDOM_TEXT, steps=4)
    recipe.logging.peak_tflops = 0.5  # a made-up peak, so that MFU is logged on the CPU
    recipe.train.profile.start, recipe.train.profile.steps = 2, 2
    result = train(recipe)
    return recipe, result


def test_tensorboard_holds_every_metric(run):
    recipe, result = run
    acc = EventAccumulator(recipe.logging.dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/consumed_samples",
        "perf/step_time_s",
        "perf/tokens_per_s",
        "perf/tflops_per_gpu",
        "perf/mfu",
        "perf/peak_memory_gb",
        "model/parameters",
    } <= tags
    scalar = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags}
    assert scalar["train/loss"] == pytest.approx(result.losses, rel=1e-6)
    for step in range(1, 5):
        assert scalar["train/lr"][step] == pytest.approx(learning_rate(step - 1, recipe.train))
        assert scalar["perf/mfu"][step] == pytest.approx(scalar["perf/tflops_per_gpu"][step] / 0.5)
        assert scalar["perf/tokens_per_s"][step] == pytest.approx(
            4 * 32 / scalar["perf/step_time_s"][step], rel=1e-4
        )
        assert scalar["train/consumed_samples"][step] == 4 * step
    assert set(acc.Tags()["tensors"]) >= {"recipe/text_summary", "pattern/text_summary"}


def test_profiler_traces_the_chosen_steps(run):
    recipe, _ = run
    (trace,) = (Path(recipe.logging.dir) / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#1", "ProfilerStep#2"}  # steps 2 and 3 (numbered from 0)
    assert any(e.get("name") == "aten::mm" for e in events)


def test_nvtx_ranges_wrap_every_block(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop", None)))
    model = HybridLM(tiny_model_config(), vocab_size=259)
    add_nvtx_ranges(model)
    model(torch.zeros(1, 8, dtype=torch.long))
    assert calls == [
        call
        for label in ("layers.0 (M)", "layers.1 (*)", "layers.2 (-)", "layers.3 (M)")
        for call in (("push", label), ("pop", None))
    ]


def test_report_renders_a_png(run, tmp_path):
    recipe, _ = run
    out = tmp_path / "report.png"
    proc = subprocess.run(
        [sys.executable, "-m", "toolkit.report", recipe.logging.dir, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    proc = subprocess.run(
        [sys.executable, "-m", "toolkit.report", str(tmp_path / "nothing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "holds no TensorBoard event files" in proc.stderr
