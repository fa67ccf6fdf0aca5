"""The demo path end to end, as a user runs it: launcher -> training -> TensorBoard events ->
Zarr checkpoint -> generation CLI (a shortened run of recipes/tiny_hybrid.toml)."""

import os
import re
import shutil
import signal
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
    import time

    from toolkit.cli import submit

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


def read_until(stream, pattern: str) -> str:
    """Lines of a child's output up to the first that matches `pattern` (all of it at its end)."""
    seen = []
    for line in stream:
        seen.append(line)
        if re.search(pattern, line):
            break
    return "".join(seen)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_says_it_stopped_when_a_signal_cuts_the_training_short(tmp_path):
    """`make demo` in a scratch directory (the repository's files linked in, a 'venv' whose
    python records its pid): SIGTERM to the training saves a checkpoint and stops it; the demo
    must then say it stopped, generate nothing and fail, not call itself finished."""
    for name in ("Makefile", "toolkit", "launchers", "recipes", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    venv, pids = tmp_path / "venv", tmp_path / "pids"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho $$ >> {pids}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (venv / ".installed").touch()  # installed: the demo installs nothing here
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "demo", f"VENV={venv}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out = read_until(proc.stdout, r"step 1/240 loss")
        trainer = int(pids.read_text().split()[0])  # launchers/submit.py --local: one rank
        os.kill(trainer, signal.SIGTERM)
        out += proc.stdout.read()
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert "stop signal received: stopping after step" in out, out[-3000:]
    assert "demo stopped: a signal cut the training short" in out
    assert "demo finished" not in out and "--- prompt" not in out
    assert proc.returncode != 0
    assert len(pids.read_text().split()) == 1  # the generation never ran
    latest = (tmp_path / "runs" / "tiny_hybrid" / "checkpoints" / "latest").read_text()
    assert latest.startswith("step_") and int(latest.strip()[5:]) < 240


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_installs_only_the_runtime_dependencies(tmp_path):
    """What `make -n` would run: the demo installs the toolkit alone (no pytest, transformers,
    lm-eval, torchao...); test and lint add the dev extras, each once (a stamp file each)."""
    for name in ("Makefile", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    venv = tmp_path / "venv"

    def planned(target: str) -> str:
        proc = subprocess.run(
            ["make", "-n", target, f"VENV={venv}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    demo = planned("demo")
    assert "-m pip install --disable-pip-version-check -q -e .\n" in demo
    assert "[dev]" not in demo and "launchers/submit.py recipes/tiny_hybrid.toml --local" in demo
    for target in ("test", "lint"):
        assert '-q -e ".[dev]"' in planned(target)
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    assert "pip install" not in planned("demo")
    assert "pip install" in planned("test")  # the dev extras are still missing
    (venv / ".installed-dev").touch()
    assert "pip install" not in planned("test") and "pip install" not in planned("lint")
