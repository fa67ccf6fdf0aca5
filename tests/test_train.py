"""The training loop: learning, exact resume, NaN policy, schedules, optimizer groups, signals."""

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL
from toolkit.config import TrainConfig, recipe_from_dict
from toolkit.model.mamba2 import Mamba2Mixer
from toolkit.optim import learning_rate, parameter_groups
from toolkit.train import TrainingError, train


def make_recipe(tmp_path, corpus_text: str, **train_overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text)
    table = {
        "model": TINY_MODEL | {"seq_length": 32},
        "data": {"source": str(corpus)},
        "train": dict(
            steps=6,
            micro_batch_size=2,
            global_batch_size=4,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=2,
            precision="fp32",
            device="cpu",
            seed=7,
        )
        | train_overrides,
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "keep_last": 0},
        "logging": {"dir": str(tmp_path / "tb"), "interval": 1, "progress_bar": False},
    }
    return recipe_from_dict(table)


RANDOM_TEXT = "".join(chr(97 + (i * 7919 % 26)) for i in range(20000))


def test_loss_falls_on_a_learnable_task(tmp_path):
    """A periodic sequence is predictable from context: the loss must fall far below the uniform
    5.56 nats (log 259) and below a unigram model of its 10 symbols (2.3 nats)."""
    recipe = make_recipe(tmp_path, "0123456789" * 3000, steps=60)
    result = train(recipe)
    assert result.losses[1] > 4.5
    assert result.losses[60] < 1.5, result.losses


def test_resume_gives_the_same_next_step_loss(tmp_path):
    full = train(make_recipe(tmp_path / "a", RANDOM_TEXT, steps=6))

    # Stop after 3 of 6 steps (same lr schedule), then run again to 6: it must resume.
    first = train(make_recipe(tmp_path / "b", RANDOM_TEXT, steps=3, decay_steps=6))
    assert first.checkpoint.endswith("step_00000003")
    resumed = train(make_recipe(tmp_path / "b", RANDOM_TEXT, steps=6))
    assert min(resumed.losses) == 4  # it resumed rather than restarting
    for step in (1, 2, 3):
        assert first.losses[step] == full.losses[step]
    for step in (4, 5, 6):
        assert resumed.losses[step] == full.losses[step], (step, resumed.losses, full.losses)


def test_checkpoint_enabled_writes_and_checkpoint_resume_reads(tmp_path):
    """The two keys are independent: checkpoint.enabled=false writes nothing but still resumes
    from what checkpoint.dir holds; with checkpoint.resume=false as well the run starts fresh
    (not refused: it cannot overwrite the checkpoints it does not write)."""
    first = train(make_recipe(tmp_path, RANDOM_TEXT, steps=3, decay_steps=5))
    written = sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    reader = make_recipe(tmp_path, RANDOM_TEXT, steps=5)
    reader.checkpoint.enabled = False
    resumed = train(reader)
    assert sorted(resumed.losses) == [4, 5] and resumed.checkpoint is None

    reader.checkpoint.resume = False
    fresh = train(reader)
    assert sorted(fresh.losses) == [1, 2, 3, 4, 5]
    assert [fresh.losses[s] for s in (1, 2, 3)] == [first.losses[s] for s in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == written

    writer = make_recipe(tmp_path, RANDOM_TEXT, steps=5)
    writer.checkpoint.resume = False
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(writer)


def test_resume_refuses_a_different_model(tmp_path):
    train(make_recipe(tmp_path, RANDOM_TEXT, steps=1))
    other = make_recipe(tmp_path, RANDOM_TEXT, steps=2)
    other.model.hidden_size = 64
    with pytest.raises(ValueError, match="different \\[model\\]"):
        train(other)


def test_init_from_starts_a_new_run_from_trained_weights(tmp_path):
    """checkpoint.init_from (fine-tuning): the weights of another run's checkpoint, then step 0,
    a new optimizer, the data from its start; the first loss is those weights' loss on the first
    batch. Once the new run has checkpoints of its own, it resumes from them instead."""
    from toolkit.build import build_data, model_from_checkpoint

    text = "0123456789" * 3000
    base = train(make_recipe(tmp_path / "base", text, steps=60))
    assert base.losses[60] < 1.5  # it learned the sequence
    tuned = make_recipe(tmp_path / "tuned", text, steps=3, micro_batch_size=4, decay_steps=5)
    tuned.checkpoint.init_from = str(tmp_path / "base" / "ckpt")
    fresh = train(make_recipe(tmp_path / "fresh", text, steps=1, micro_batch_size=4))
    first = train(tuned)
    assert sorted(first.losses) == [1, 2, 3]
    # The base run's weights on the new run's first batch, computed here.
    model, _, tokenizer = model_from_checkpoint(str(tmp_path / "base" / "ckpt"))
    inputs, labels = build_data(tuned, tokenizer)[0].batch(0, 4)
    with torch.no_grad():
        logits = model(inputs)[..., : model.vocab_size]  # the padded rows are no tokens
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    assert first.losses[1] == pytest.approx(expected.item(), rel=1e-5)
    assert first.losses[1] < 2.0 < fresh.losses[1]  # not the fresh weights' loss
    # Its own checkpoints now exist: running on resumes at step 4, not from the base weights.
    tuned.train.steps = 5
    resumed = train(tuned)
    assert sorted(resumed.losses) == [4, 5]


def test_init_from_that_does_not_fit_is_refused_naming_the_key(tmp_path):
    train(make_recipe(tmp_path / "base", RANDOM_TEXT, steps=1))
    missing = make_recipe(tmp_path / "a", RANDOM_TEXT, steps=1)
    missing.checkpoint.init_from = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="checkpoint.init_from=.*nothing.*neither a checkpoint"):
        train(missing)
    wider = make_recipe(tmp_path / "b", RANDOM_TEXT, steps=1)
    wider.model.hidden_size = 64
    wider.checkpoint.init_from = str(tmp_path / "base" / "ckpt")
    with pytest.raises(ValueError, match="checkpoint.init_from=.*has shape"):
        train(wider)
    assert not (tmp_path / "b" / "ckpt").exists()  # refused before any step was saved


def poison_loss(monkeypatch, bad_calls: set[int]):
    """Make the loss non-finite on the given loss_fn calls (0-based), as a blow-up would."""
    import toolkit.parallel.parallelize as parallelize  # where the trainer's loss is chosen

    real, calls = parallelize.cross_entropy, [0]

    def loss_fn(logits, labels, **kwargs):
        loss = real(logits, labels, **kwargs)
        calls[0] += 1
        return loss * float("nan") if calls[0] - 1 in bad_calls else loss

    monkeypatch.setattr(parallelize, "cross_entropy", loss_fn)


def test_nan_loss_stops(tmp_path, monkeypatch):
    poison_loss(monkeypatch, {2})  # micro-batch 0 of step 2 (2 micro-batches per step)
    with pytest.raises(TrainingError, match="step 2: loss is nan"):
        train(make_recipe(tmp_path, RANDOM_TEXT, steps=4))


def test_nan_loss_skips_then_recovers(tmp_path, monkeypatch):
    poison_loss(monkeypatch, {2, 4})  # steps 2 and 3
    result = train(make_recipe(tmp_path, RANDOM_TEXT, steps=5, nan_policy="skip"))
    assert result.skipped_steps == 2
    assert sorted(result.losses) == [1, 4, 5]
    assert all(math.isfinite(v) for v in result.losses.values())


def test_nan_loss_skip_gives_up(tmp_path, monkeypatch):
    poison_loss(monkeypatch, set(range(100)))
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        train(make_recipe(tmp_path, RANDOM_TEXT, steps=8, nan_policy="skip", max_skipped_steps=2))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = train(make_recipe(tmp_path / "a", RANDOM_TEXT, steps=3, micro_batch_size=4))
    accumulated = train(make_recipe(tmp_path / "b", RANDOM_TEXT, steps=3, micro_batch_size=1))
    for step in (1, 2, 3):
        assert accumulated.losses[step] == pytest.approx(big.losses[step], rel=1e-5)


def test_signal_saves_a_checkpoint_and_stops(tmp_path):
    from toolkit.train import StopRequest

    stop = StopRequest()
    stop.signum = 15  # as if SIGTERM arrived during the first step
    result = train(make_recipe(tmp_path, RANDOM_TEXT, steps=6), stop)
    assert result.stopped_by_signal and sorted(result.losses) == [1]
    assert result.checkpoint.endswith("step_00000001")


def test_bf16_autocast_trains(tmp_path):
    result = train(make_recipe(tmp_path, "0123456789" * 3000, steps=20, precision="bf16"))
    assert result.losses[20] < result.losses[1] - 1.0


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    cfg = TrainConfig(
        steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, lr_schedule=schedule, wsd_decay_fraction=0.2
    )
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    if schedule == "cosine":
        assert lrs[10] == pytest.approx(1.0)
        assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
        assert lrs[99] == pytest.approx(0.1, abs=1e-3)
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    elif schedule == "wsd":
        assert lrs[79] == 1.0 and lrs[90] == pytest.approx(0.55) and lrs[99] < 0.2
    else:
        assert set(lrs[10:]) == {1.0}


@pytest.mark.parametrize(
    "style, share",
    [
        ("linear", lambda r: 1 - r),
        ("cosine", lambda r: 0.5 * (math.cos(math.pi * r) + 1)),
        ("exponential", lambda r: 2 * 0.5**r - 1),
        ("minus_sqrt", lambda r: 1 - math.sqrt(r)),
    ],
)
def test_wsd_decays_over_its_steps_in_each_shape(style, share):
    """train.wsd_decay_steps and train.wsd_decay_style (Megatron's --lr-wsd-decay-iters and
    --lr-wsd-decay-style): lr until the last 30 of the 100 decay steps, then min_lr plus the
    shape's share of (lr - min_lr), by the fraction of the decay done."""
    cfg = TrainConfig(steps=120, decay_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    cfg.lr_schedule, cfg.wsd_decay_steps, cfg.wsd_decay_style = "wsd", 30, style
    cfg.validate()
    lrs = [learning_rate(s, cfg) for s in range(120)]
    assert set(lrs[10:71]) == {1.0}
    for step in (75, 85, 99):
        assert lrs[step] == pytest.approx(0.1 + 0.9 * share((step - 70) / 30)), step
    assert lrs[100:] == pytest.approx([0.1] * 20)


def test_wsd_keys_are_refused_where_they_would_be_ignored():
    cfg = TrainConfig(steps=100, lr_schedule="cosine", wsd_decay_style="cosine")
    with pytest.raises(ValueError, match="train.wsd_decay_style: is read by .*'wsd' only"):
        cfg.validate()
    cfg = TrainConfig(steps=100, lr_schedule="wsd", decay_steps=50, wsd_decay_steps=60)
    with pytest.raises(ValueError, match="train.wsd_decay_steps: 60 is more than the 50"):
        cfg.validate()


def test_no_weight_decay_on_norms_biases_and_ssm_parameters():
    mixer = Mamba2Mixer(32, d_state=8, head_dim=8, num_groups=2)
    decay, no_decay = parameter_groups(mixer, 0.1)
    names = {id(p): n for n, p in mixer.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "in_proj.weight",
        "out_proj.weight",
        "conv1d.weight",
    }
    assert {names[id(p)] for p in no_decay["params"]} == {
        "A_log",
        "D",
        "dt_bias",
        "norm.weight",
        "conv1d.bias",
    }
    assert no_decay["weight_decay"] == 0.0


def test_mamba_init_matches_the_reference_ranges():
    mixer = Mamba2Mixer(256, d_state=8, head_dim=8, num_groups=2)
    A = torch.exp(mixer.A_log)
    assert A.min() >= 1 and A.max() <= 16
    assert torch.all(mixer.D == 1)
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 0.1 + 1e-6


def test_a_fresh_run_never_overwrites_checkpoints(tmp_path):
    train(make_recipe(tmp_path, RANDOM_TEXT, steps=1))
    fresh = make_recipe(tmp_path, RANDOM_TEXT, steps=1)
    fresh.checkpoint.resume = False
    with pytest.raises(ValueError, match="already holds checkpoints \\(latest step_00000001\\)"):
        train(fresh)


def test_checkpointing_can_be_switched_off(tmp_path):
    recipe = make_recipe(tmp_path, RANDOM_TEXT, steps=2)
    recipe.checkpoint.enabled = False
    assert train(recipe).checkpoint is None
    assert not (tmp_path / "ckpt").exists()


def test_pre_timeout_signal_requeues_the_slurm_job(tmp_path, monkeypatch):
    """USR2 (Slurm's signal before the time limit): checkpoint, then `scontrol requeue`."""
    import os
    import signal

    from toolkit.train import StopRequest

    calls = tmp_path / "calls"
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    stop = StopRequest()
    stop.signum = signal.SIGTERM  # a preemption: Slurm requeues by itself, we only checkpoint
    train(make_recipe(tmp_path / "a", RANDOM_TEXT, steps=4), stop)
    assert not calls.exists()
    stop.signum = signal.SIGUSR2
    result = train(make_recipe(tmp_path / "b", RANDOM_TEXT, steps=4), stop)
    assert result.stopped_by_signal and result.checkpoint.endswith("step_00000001")
    assert calls.read_text() == "show job 77\nrequeue 77\n"  # its time limit, then requeue


def test_activation_checkpointing_trains_to_the_same_losses(tmp_path):
    """Recomputing every block in backward replays the same fp32 ops: the same losses (equal to
    1e-6 relative; bitwise in practice)."""
    plain = train(make_recipe(tmp_path / "a", RANDOM_TEXT, steps=3))
    ac = train(make_recipe(tmp_path / "b", RANDOM_TEXT, steps=3, activation_checkpointing="full"))
    assert ac.losses == pytest.approx(plain.losses, rel=1e-6)


def test_compiled_blocks_train_and_sample(tmp_path):
    """train.compile through the trainer: the same losses as eager within 1e-4 relative (inductor
    reorders fp32 reductions), and the closing sample decodes with the blocks run eagerly."""
    from tests.test_activation_checkpoint import inductor_available

    reason = inductor_available()
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    plain = train(make_recipe(tmp_path / "a", RANDOM_TEXT, steps=2))
    compiled = train(
        make_recipe(tmp_path / "b", RANDOM_TEXT, steps=2, compile=["mlp"], sample_prompt="ab")
    )
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-4)
    assert compiled.sample.startswith("ab")


def test_the_closing_samples_decode_path_is_warmed_at_start_up(tmp_path, caplog):
    """With train.sample_prompt set, the trainer warms the decode path before the first step
    (on GPUs; forced here on the CPU) and logs its time; the run is the one without it, the
    same loss and the same sample."""
    plain = train(make_recipe(tmp_path / "a", RANDOM_TEXT, steps=1, sample_prompt="ab"))
    assert "decode path warmed" not in caplog.text  # the CPU skips it unless forced
    caplog.set_level(logging.INFO, logger="toolkit.train")
    result = train(
        make_recipe(tmp_path / "b", RANDOM_TEXT, steps=1, sample_prompt="ab"), force_warm_up=True
    )
    lines = [r.getMessage() for r in caplog.records]
    warm = next(i for i, m in enumerate(lines) if m.startswith("decode path warmed in "))
    assert warm < next(i for i, m in enumerate(lines) if m.startswith("layout: "))  # start-up
    assert result.losses == plain.losses and result.sample == plain.sample
    assert result.sample.startswith("ab")


@pytest.mark.parametrize("max_norm", [1e9, 0.5], ids=["not clipped", "clipped"])
def test_clip_grad_norm_equals_torchs(max_norm):
    """The single-process path of our clipping (one multi-tensor norm kernel): the same norm and
    the same scaled gradients as torch's clip_grad_norm_, parameters without gradients skipped."""
    from toolkit.distributed import ParallelEnv
    from toolkit.parallel.runtime import clip_grad_norm

    g = torch.Generator().manual_seed(0)
    ours, theirs = [], []
    for shape in [(7, 5), (3,), (), (4, 4, 2)]:
        grad = torch.randn(shape, generator=g)
        for group in (ours, theirs):
            p = torch.nn.Parameter(torch.zeros(shape))
            p.grad = grad.clone()
            group.append(p)
    ours.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: skipped
    env = ParallelEnv(0, 1, 0, torch.device("cpu"), 1, 1, 1)
    total = clip_grad_norm(ours, max_norm, env)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert total == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    assert ours[-1].grad is None


# ---- resuming past a damaged checkpoint (checkpoint.on_corrupt) ----

DAMAGED = ("model", "output_layer.weight", "c", "1", "0")  # a chunk of a model array


def damage(step_dir, how: str) -> None:
    """Flip one bit of a chunk, or cut the chunk file short, as a bad disk or copy would."""
    chunk = step_dir.joinpath(*DAMAGED)
    data = bytearray(chunk.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2 :]
    chunk.write_bytes(bytes(data))


def checkpoint_recipe(tmp_path, steps: int, on_corrupt: str = "fallback"):
    """Checkpoints every 2 steps, the same lr schedule whatever `steps` is."""
    recipe = make_recipe(tmp_path, RANDOM_TEXT, steps=steps, decay_steps=6)
    recipe.checkpoint.interval = 2
    recipe.checkpoint.keep_last = 2
    recipe.checkpoint.on_corrupt = on_corrupt
    return recipe


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, caplog, how):
    first = train(checkpoint_recipe(tmp_path, steps=4))
    ckpt = tmp_path / "ckpt"
    damage(ckpt / "step_00000004", how)
    damaged = (ckpt / "step_00000004").joinpath(*DAMAGED).read_bytes()

    with caplog.at_level(logging.WARNING):
        resumed = train(checkpoint_recipe(tmp_path, steps=6))
    assert sorted(resumed.losses) == [3, 4, 5, 6]  # it resumed from step 2, not from scratch
    for step in (3, 4):  # and continued bit for bit as the run that wrote step 2 did
        assert resumed.losses[step] == first.losses[step], (step, resumed.losses, first.losses)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"checkpoint {ckpt / 'step_00000004'} is damaged" in w
        and "array 'model/output_layer.weight': chunk c/1/0 is corrupted" in w
        for w in warnings
    ), warnings
    assert any(
        f"RESUMING FROM AN OLDER CHECKPOINT: {ckpt / 'step_00000002'} (step 2)" in w
        and "steps 3-4 (2 steps) will be trained again" in w
        and "kept as corrupt-step_00000004" in w
        for w in warnings
    ), warnings
    # The damaged checkpoint is kept as it was, out of retention's way; step 4 was saved anew,
    # `latest` follows the new saves, and keep_last=2 removed step 2 as usual.
    assert (ckpt / "corrupt-step_00000004").joinpath(*DAMAGED).read_bytes() == damaged
    assert sorted(p.name for p in ckpt.iterdir() if "step" in p.name) == [
        "corrupt-step_00000004",
        "step_00000004",
        "step_00000006",
    ]
    assert (ckpt / "latest").read_text() == "step_00000006\n"
    again = train(checkpoint_recipe(tmp_path, steps=6))  # the new step 4 and 6 are intact
    assert again.losses == {}


def test_a_damaged_latest_pointer_falls_back_to_the_newest_checkpoint(tmp_path, caplog):
    train(checkpoint_recipe(tmp_path, steps=4))
    (tmp_path / "ckpt" / "latest").write_bytes(b"step_0\x80000004\n")
    with caplog.at_level(logging.WARNING):
        resumed = train(checkpoint_recipe(tmp_path, steps=6))
    assert sorted(resumed.losses) == [5, 6]
    assert "trying the newest published checkpoint instead" in caplog.text


def write_toml(path, table: dict) -> None:
    def value(v):
        return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v

    lines = []
    for section, keys in table.items():
        lines += [f"[{section}]", *(f"{k} = {value(v)}" for k, v in keys.items() if v is not None)]
    path.write_text("\n".join(lines) + "\n")


def train_cli(tmp_path, recipe) -> subprocess.CompletedProcess:
    table = recipe.to_dict()
    for section in ("parallel", "slurm", "name"):
        table.pop(section)
    table["train"].pop("profile")
    write_toml(tmp_path / "recipe.toml", table)
    return subprocess.run(
        [sys.executable, "-m", "toolkit.train", str(tmp_path / "recipe.toml")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_resume_with_no_intact_checkpoint_exits_1_with_one_line(tmp_path):
    train(checkpoint_recipe(tmp_path, steps=4))
    ckpt = tmp_path / "ckpt"
    damage(ckpt / "step_00000004", "flip")
    damage(ckpt / "step_00000002", "truncate")
    proc = train_cli(tmp_path, checkpoint_recipe(tmp_path, steps=6))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert f"no intact checkpoint to resume from in {ckpt}" in errors[0]
    assert "step_00000004: " in errors[0] and "step_00000002: " in errors[0]
    # Nothing was moved or re-pointed: the user finds the directory as it was.
    assert sorted(p.name for p in ckpt.glob("*step*")) == ["step_00000002", "step_00000004"]
    assert (ckpt / "latest").read_text() == "step_00000004\n"


def test_on_corrupt_fail_exits_1_naming_the_damaged_checkpoint(tmp_path):
    train(checkpoint_recipe(tmp_path, steps=4))
    ckpt = tmp_path / "ckpt"
    damage(ckpt / "step_00000004", "flip")
    proc = train_cli(tmp_path, checkpoint_recipe(tmp_path, steps=6, on_corrupt="fail"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert f"checkpoint {ckpt / 'step_00000004'} is damaged" in errors[0]
    assert "'model/output_layer.weight': chunk c/1/0 is corrupted" in errors[0]
    assert "checkpoint.on_corrupt='fail'" in errors[0]
    assert sorted(p.name for p in ckpt.glob("*step*")) == ["step_00000002", "step_00000004"]
