"""What a run shows: TensorBoard scalars and text read back with TensorBoard's own reader, MFU,
a torch.profiler trace of chosen steps, NVTX ranges around blocks, and the PNG report."""

import json
import logging
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
    recipe.data.valid_fraction, recipe.train.eval_interval, recipe.train.eval_batches = 0.1, 2, 3
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
        "perf/tflops_per_rank",
        "perf/mfu",
        "perf/peak_memory_gb",
        "model/parameters",
        "valid/loss",
        "valid/perplexity",
    } <= tags
    scalar = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags}
    assert scalar["train/loss"] == pytest.approx(result.losses, rel=1e-6)
    for step in range(1, 5):
        assert scalar["train/lr"][step] == pytest.approx(learning_rate(step - 1, recipe.train))
        assert scalar["perf/mfu"][step] == pytest.approx(scalar["perf/tflops_per_rank"][step] / 0.5)
        assert scalar["perf/tokens_per_s"][step] == pytest.approx(
            4 * 32 / scalar["perf/step_time_s"][step], rel=1e-4
        )
        assert scalar["train/consumed_samples"][step] == 4 * step
    assert set(acc.Tags()["tensors"]) >= {"recipe/text_summary", "pattern/text_summary"}


def test_the_step_log_says_tflops_per_rank(tmp_path, caplog):
    """A CPU run has no GPU: its TFLOP/s are per rank (one GPU each, on GPUs)."""
    with caplog.at_level(logging.INFO, logger="toolkit.train"):
        train(make_recipe(tmp_path, RANDOM_TEXT, steps=1))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1/1 ")]
    assert len(lines) == 1 and " TFLOP/s per rank " in lines[0], lines
    assert "GPU" not in lines[0]


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


def test_validation_loss_is_the_held_out_loss_of_the_model(run):
    """valid/loss at the last step equals the loss of the saved model on the corpus's held-out
    end, recomputed here independently; perplexity is its exponential."""
    import math

    import numpy as np
    import torch.nn.functional as F

    from toolkit.build import model_from_checkpoint
    from toolkit.data import SequenceSampler

    recipe, result = run
    acc = EventAccumulator(recipe.logging.dir)
    acc.Reload()
    valid = {e.step: e.value for e in acc.Scalars("valid/loss")}
    perplexity = {e.step: e.value for e in acc.Scalars("valid/perplexity")}
    assert sorted(valid) == [2, 4]
    for step in valid:
        assert perplexity[step] == pytest.approx(math.exp(valid[step]), rel=1e-5)
    model, _, tokenizer = model_from_checkpoint(result.checkpoint)
    tokens = np.array([*RANDOM_TEXT.encode(), tokenizer.eod])  # the corpus ends with <eod>
    held_out = tokens[len(tokens) - int(len(tokens) * 0.1) :]
    seq = recipe.model.seq_length
    losses = []
    sampler = SequenceSampler(held_out.astype(np.int64), seq, recipe.train.seed)
    with torch.no_grad():
        for i in range(3):  # eval_batches micro-batches of micro_batch_size windows
            inputs, labels = sampler.batch(2 * i, 2)
            logits = model(inputs)[..., : model.vocab_size]
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item())
    assert valid[4] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert valid[4] != pytest.approx(result.losses[4], rel=1e-3)  # not the training batch


def test_validation_settings_are_checked(tmp_path):
    from toolkit.config import RecipeError, validate

    with pytest.raises(RecipeError, match="train.eval_interval.*data.valid_fraction"):
        make_recipe(tmp_path, RANDOM_TEXT, eval_interval=5)
    recipe = make_recipe(tmp_path, RANDOM_TEXT)
    recipe.data.valid_fraction = 0.6
    with pytest.raises(RecipeError, match=r"data.valid_fraction.*\[0, 0.5\)"):
        validate(recipe)


class FakeClock:
    """time.perf_counter for toolkit.train: one second a call, plus what the test adds."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_step_time_counts_the_work_between_steps(tmp_path, monkeypatch):
    """The update queued at a step's end runs on the GPU while the host logs, and the next loss
    fetch waits for it: a step's time runs from the previous step's end, so what the host does
    between steps counts (5 s here), while validation (100 s) is not the next step's time."""
    import toolkit.metrics
    import toolkit.train

    clock = FakeClock()
    monkeypatch.setattr(toolkit.train, "time", clock)
    logged = toolkit.metrics.Metrics.train_step

    def slow_log(self, step, stats, consumed):
        logged(self, step, stats, consumed)
        clock.now += 5.0

    def slow_validation(self):
        clock.now += 100.0
        return 1.0

    monkeypatch.setattr(toolkit.metrics.Metrics, "train_step", slow_log)
    monkeypatch.setattr(toolkit.train.Trainer, "validation_loss", slow_validation)
    recipe = make_recipe(tmp_path, RANDOM_TEXT, steps=4)
    recipe.data.valid_fraction, recipe.train.eval_interval = 0.1, 2
    recipe.checkpoint.enabled = False
    train(recipe)
    acc = EventAccumulator(recipe.logging.dir)
    acc.Reload()
    seconds = {e.step: e.value for e in acc.Scalars("perf/step_time_s")}
    # Step 1 from its start; step 2 after 5 s of logging; step 3 after validation: from its own
    # start; step 4 after logging again.
    assert seconds == {1: 1.0, 2: 6.0, 3: 1.0, 4: 6.0}
