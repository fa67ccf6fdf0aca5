"""The demo path end to end, as a user runs it: launcher -> training -> TensorBoard events ->
Zarr checkpoint -> generation CLI (a shortened run of recipes/tiny_hybrid.toml)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT, timeout=600):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run(
        "launchers/submit.py",
        "recipes/tiny_hybrid.toml",
        "--local",
        "--set",
        "train.steps=40",
        "--set",
        "checkpoint.interval=20",
        "--set",
        f'checkpoint.dir="{out / "ckpt"}"',
        "--set",
        f'logging.dir="{out / "tb"}"',
        "--set",
        "logging.interval=5",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr + proc.stdout


def test_demo_trains_and_the_loss_falls(demo_run):
    _, log = demo_run
    first, last = map(float, re.search(r"loss: step 1 ([\d.]+) -> step 40 ([\d.]+)", log).groups())
    assert first > 5.0 and last < first - 2.0, (first, last)
    assert "pattern MM-*M-" in log  # the layout is printed at start-up
    # Not a terminal: one progress line per logging interval instead of a live bar.
    assert re.search(r"step 40/40 loss [\d.]+ lr [\d.e+-]+ grad_norm [\d.]+ \d+ tokens/s", log)
    assert "sample (temperature 0.7, top-k 20) from 'def '" in log


def test_demo_writes_tensorboard_scalars(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = demo_run
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/step_time_s",
        "perf/peak_memory_gb",
        "model/parameters",
    ):
        assert tag in tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    assert loss[-1].value < loss[0].value
    assert acc.Scalars("model/parameters")[0].value > 1e6


def test_demo_checkpoint_and_generation_cli(demo_run):
    out, _ = demo_run
    ckpt = out / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_00000040"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000020", "step_00000040"]
    proc = run(
        "-m",
        "toolkit.inference.generate",
        "--checkpoint",
        str(ckpt),
        "--prompt",
        "import ",
        "--max-new-tokens",
        "40",
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.split("--- prompt: 'import '\n", 1)[1]
    assert text.startswith("import ") and len(text) > len("import ") + 10
    again = run(
        "-m",
        "toolkit.inference.generate",
        "--checkpoint",
        str(ckpt),
        "--prompt",
        "import ",
        "--max-new-tokens",
        "40",
    )
    assert again.stdout == proc.stdout  # greedy decoding is deterministic


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recipes/tiny_hybrid.toml", "--set", "slurm.tasks_per_node=8"], "the world size is 8"),
        (
            ["recipes/tiny_hybrid.toml", "--local", "--set", "model.hiden_size=3"],
            "model.hiden_size: unknown key",
        ),
        (["recipes/nope.toml", "--local"], "no such recipe file"),
        (["recipes/tiny_hybrid.toml", "--local", "--set", "parallel.tp=5"], "parallel.tp"),
    ],
)
def test_launcher_bad_input_exits_2(args, message):
    proc = run("launchers/submit.py", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "module", ["toolkit.train", "toolkit.layout", "toolkit.inference.generate"]
)
def test_help(module):
    proc = run("-m", module, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_generation_cli_names_a_missing_checkpoint(tmp_path):
    proc = run("-m", "toolkit.inference.generate", "--checkpoint", str(tmp_path))
    assert proc.returncode == 2 and str(tmp_path) in proc.stderr


def test_config_cli_validates_and_lists_keys():
    ok = run("-m", "toolkit.config", "recipes/8b_hybrid.toml", "--world-size", "8")
    assert ok.returncode == 0 and '"tp": 4' in ok.stdout
    bad = run("-m", "toolkit.config", "recipes/8b_hybrid.toml", "--world-size", "6")
    assert bad.returncode == 2 and "world size 6 is not divisible by TP x PP = 4" in bad.stderr
    keys = run("-m", "toolkit.config", "--keys")
    assert "  mamba_state_dim (int, 128): Mamba-2 state size N" in keys.stdout


def test_local_launcher_kills_ranks_that_ignore_sigterm():
    """A rank stuck in a collective with a dead peer never reaches the step boundary where it
    would stop: after the grace period the launcher must kill it rather than wait forever."""
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("submit", ROOT / "launchers" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:  # SIGTERM ignored from here on (a fixed sleep raced a loaded machine)
        assert p.stdout.readline() == "ready\n"
    start = time.monotonic()
    submit.stop_all(procs, grace_s=1.0)
    assert time.monotonic() - start < 10
    assert [p.returncode for p in procs] == [-9, -9]


def test_dry_run_prints_the_sbatch_script():
    proc = run(
        "launchers/submit.py",
        "recipes/tiny_hybrid.toml",
        "--dry-run",
        "--nodes",
        "2",
        "--set",
        "parallel.dp=-1",
        "--set",
        "train.micro_batch_size=8",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        "#!/bin/bash\n#SBATCH --job-name=tiny_hybrid\n#SBATCH --nodes=2\n"
    )
    assert "--gpus-per-node" not in proc.stdout and "srun --kill-on-bad-exit=1" in proc.stdout
