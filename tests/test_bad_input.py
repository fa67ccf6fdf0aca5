"""Bad input anywhere, as the README promises: exit status 2, one line naming the file and the key
(or the flag), no traceback, nothing created, nothing launched. Each case runs as a user runs it
(a subprocess) in an empty working directory, which must stay empty."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = str(ROOT / "launchers" / "submit.py")

# A small valid recipe; its outputs would go under the working directory.
RECIPE = """\
name = "probe"

[model]
num_layers = 4
hidden_size = 32
seq_length = 16
pattern = "M*-M"
att_ratio = 0.25
mlp_ratio = 0.25
num_attention_heads = 4
num_query_groups = 2
mamba_state_dim = 8
mamba_head_dim = 8
mamba_num_groups = 2
mamba_chunk_size = 8

[data]
max_corpus_bytes = 20000

[train]
steps = 1
precision = "fp32"
device = "cpu"

[parallel]
dp = 1

[checkpoint]
dir = "runs/probe/checkpoints"

[logging]
dir = "runs/probe/tensorboard"
progress_bar = false

[slurm]
gpus_per_node = 0
cpus_per_task = 1
time = "00:10:00"
"""


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_refused(proc: subprocess.CompletedProcess, cwd: Path, before: set, *words: str):
    """Exit 2, no traceback, one error line holding every word, nothing new in cwd."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    assert {p.name for p in cwd.iterdir()} == before, "bad input created files"


def case(id: str, *sets: str, words: tuple[str, ...], text: bytes | None = None):
    return pytest.param(sets, words, text, id=id)


# (--set overrides, words the error line must hold, the recipe's bytes if not RECIPE + overrides)
MALFORMED = [
    case("not-utf8", words=("recipe.toml", "not UTF-8"), text=RECIPE.encode() + b"# caf\xe9\n"),
    case("not-toml", words=("recipe.toml", "not valid TOML"), text=b"[model\nnum_layers = 4\n"),
    case("unknown-key", "model.hiden_size=4", words=("recipe.toml", "model.hiden_size")),
    case("wrong-type", "train.steps='many'", words=("recipe.toml", "train.steps")),
    case("layers-1e9", "model.num_layers=1000000000", words=("recipe.toml", "model.num_layers")),
    case("layers-1e20", "model.num_layers=100000000000000000000", words=("model.num_layers",)),
    case("lr-inf", "train.lr=inf", words=("recipe.toml", "train.lr", "finite")),
    case("lr-huge-int", "train.lr=" + "9" * 400, words=("recipe.toml", "train.lr")),
    case("clip-nan", "train.grad_clip=nan", words=("recipe.toml", "train.grad_clip", "finite")),
    case("wd-negative", "train.weight_decay=-1.0", words=("recipe.toml", "train.weight_decay")),
    case("beta-1", "train.adam_beta1=1.0", words=("recipe.toml", "train.adam_beta1")),
    case("seed-negative", "train.seed=-1", words=("recipe.toml", "train.seed")),
    case("batch-zero", "train.micro_batch_size=0", words=("recipe.toml", "train.micro_batch_size")),
    case("name-escapes", "name='../../escaped'", words=("recipe.toml", "name:", "path component")),
    case("name-absolute", "name='/tmp/x'", words=("recipe.toml", "name:")),
    case("empty-ckpt-dir", "checkpoint.dir=''", words=("recipe.toml", "checkpoint.dir")),
    case("slurm-time", "slurm.time='2h'", words=("recipe.toml", "slurm.time")),
    case("slurm-newline", 'slurm.partition="a\\nb"', words=("recipe.toml", "slurm.partition")),
    case("slurm-nodes", "slurm.nodes=0", words=("recipe.toml", "slurm.nodes")),
    case("tp-heads", "parallel.tp=3", words=("recipe.toml", "parallel.tp", "divisible")),
    case("pp-layers", "parallel.pp=3", words=("recipe.toml", "parallel.pp")),
]

ENTRY_POINTS = {
    "toolkit.config": ["-m", "toolkit.config"],
    "submit --dry-run": [SUBMIT, "--dry-run"],
    "submit --local": [SUBMIT, "--local"],
    "submit --local --dry-run": [SUBMIT, "--local", "--dry-run"],
}


# Every case through toolkit.config in make test; through the launchers too in make test-long.
ENTRIES = [
    e if e == "toolkit.config" else pytest.param(e, marks=pytest.mark.long) for e in ENTRY_POINTS
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(("sets", "words", "text"), MALFORMED)
def test_malformed_recipe_is_refused(tmp_path, entry, sets, words, text):
    (tmp_path / "recipe.toml").write_bytes(text if text is not None else RECIPE.encode())
    before = {"recipe.toml"}
    args = [*ENTRY_POINTS[entry], "recipe.toml", *[a for s in sets for a in ("--set", s)]]
    proc = run(*args, cwd=tmp_path, env={"PATH": ""})  # and no Slurm to submit to
    assert_refused(proc, tmp_path, before, *words)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("recipe", "words"),
    [("folder", ("folder", "is a directory")), ("missing.toml", ("missing.toml", "no such"))],
)
def test_what_is_not_a_recipe_file_is_refused(tmp_path, entry, recipe, words):
    (tmp_path / "folder").mkdir()
    proc = run(*ENTRY_POINTS[entry], recipe, cwd=tmp_path)
    assert_refused(proc, tmp_path, {"folder"}, *words)


@pytest.mark.long  # make test-long (CI runs it)
@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["data.source='no-such-corpus.txt'"], ("recipe.toml", "data.source")),
        (["data.tokenizer='no-such.json'"], ("recipe.toml", "data.tokenizer")),
        (["parallel.tp=2"], ("recipe.toml", "world size is 1")),  # 1 rank here, 2 asked
        (["train.device='cuda:7'"], ("recipe.toml", "train.device")),
        (["checkpoint.dir='a-file/ckpt'"], ("recipe.toml", "checkpoint.dir", "a-file")),
        (["logging.dir='a-file/tb'"], ("recipe.toml", "logging.dir", "a-file")),
    ],
    ids=["corpus", "tokenizer", "world-size", "device", "ckpt-under-file", "logs-under-file"],
)
def test_what_only_this_machine_can_tell_is_refused_before_training(tmp_path, sets, words):
    """Data files, the tokenizer, the ranks and the device are checked as training starts, still
    before anything is written."""
    if "cuda" in sets[0]:
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    (tmp_path / "recipe.toml").write_text(RECIPE)
    (tmp_path / "a-file").write_text("")
    proc = run(
        SUBMIT, "recipe.toml", "--local", *[a for s in sets for a in ("--set", s)], cwd=tmp_path
    )
    assert_refused(proc, tmp_path, {"recipe.toml", "a-file"}, *words)


def test_local_dry_run_starts_nothing(tmp_path):
    (tmp_path / "recipe.toml").write_text(RECIPE)
    proc = run(SUBMIT, "recipe.toml", "--local", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("would run here (1 process): ")
    assert proc.stdout.rstrip().endswith("-m toolkit.train recipe.toml")
    assert "step" not in proc.stderr and "loss" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.toml"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--local", "--emit-sbatch", "job.sbatch"], ("--emit-sbatch", "--local")),
        (["--local", "--nodes", "2"], ("--nodes", "--local")),
        (["--local", "--chain", "3"], ("--chain", "--local")),
        (["--local", "--nproc", "0"], ("--nproc",)),
        (["--nproc", "2"], ("--nproc", "--local")),
        (["--chain", "0"], ("--chain",)),
        (["--emit-sbatch", "no-such-dir/job.sbatch"], ("--emit-sbatch", "no-such-dir")),
        (["--emit-sbatch", "."], ("--emit-sbatch",)),
        (["--time", "soon"], ("recipe.toml", "slurm.time")),
        (["--nodes", "0"], ("recipe.toml", "slurm.nodes")),
    ],
)
def test_bad_submit_flags_are_refused(tmp_path, flags, words):
    (tmp_path / "recipe.toml").write_text(RECIPE)
    proc = run(SUBMIT, "recipe.toml", *flags, cwd=tmp_path)
    assert_refused(proc, tmp_path, {"recipe.toml"}, *words)


# ---------------------------------------------------------------------------------------------
# No Slurm on this machine: say so, and what to do instead.


@pytest.mark.parametrize(
    ("script", "args", "words"),
    [
        ("submit.py", ["recipe.toml"], ("sbatch is not on PATH", "--local")),
        ("submit.py", ["recipe.toml", "--via", "sbatch"], ("sbatch is not on PATH", "--local")),
        ("status.py", [], ("squeue is not on PATH", "--local")),
        ("serve_slurm.py", ["--checkpoint", "ckpt"], ("sbatch is not on PATH", "serve.py")),
    ],
)
def test_without_slurm_the_launchers_say_so(tmp_path, script, args, words):
    (tmp_path / "recipe.toml").write_text(RECIPE)
    if script == "serve_slurm.py":
        make_checkpoint(tmp_path / "ckpt")
    before = {p.name for p in tmp_path.iterdir()}
    empty = tmp_path.parent / f"{tmp_path.name}-bin"
    empty.mkdir()
    launcher = str(ROOT / "launchers" / script)
    proc = run(launcher, *args, cwd=tmp_path, env={"PATH": str(empty)})
    assert_refused(proc, tmp_path, before, "Slurm was not found", *words)


@pytest.mark.parametrize(
    ("script", "args"),
    [("submit.py", ["recipe.toml", "--via", "sbatch"]), ("status.py", [])],
)
def test_slurm_installed_but_not_set_up_is_said_plainly(tmp_path, script, args):
    """Slurm's commands without a configuration print 'fatal: Could not establish a
    configuration source': not a job Slurm refused, and no partition to blame."""
    (tmp_path / "recipe.toml").write_text(RECIPE)
    bin_dir = tmp_path.parent / f"{tmp_path.name}-bin"
    bin_dir.mkdir()
    for command in ("sbatch", "squeue"):
        fake = bin_dir / command
        fake.write_text(
            f"#!/bin/sh\necho '{command}: error: fetch_config: DNS SRV lookup failed' >&2\n"
            f"echo '{command}: fatal: Could not establish a configuration source' >&2\nexit 1\n"
        )
        fake.chmod(0o755)
    launcher = str(ROOT / "launchers" / script)
    proc = run(launcher, *args, cwd=tmp_path, env={"PATH": str(bin_dir)})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "sinfo" not in proc.stderr
    assert "Slurm is installed but not set up on this machine" in proc.stderr
    assert "Could not establish a configuration source" in proc.stderr


def make_checkpoint(path: Path) -> None:
    import tomllib

    from toolkit.build import build_model, save_model_checkpoint
    from toolkit.config import recipe_from_dict
    from toolkit.tokenizer import ByteTokenizer

    recipe = recipe_from_dict(tomllib.loads(RECIPE))
    save_model_checkpoint(path, build_model(recipe, ByteTokenizer()), recipe)


# ---------------------------------------------------------------------------------------------
# The other entry points: bad flags and paths.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    make_checkpoint(path)
    return path


TOOLS = [
    (["-m", "toolkit.config", "recipe.toml", "--world-size", "0"], ("--world-size",)),
    (["-m", "toolkit.layout", "--layers", "100000000000000000000"], ("num_layers",)),
    (["-m", "toolkit.evaluate", "--recipe", "recipe.toml", "--checkpoint", "nope"], ("nope",)),
    (["-m", "toolkit.evaluate", "--recipe", "folder", "--checkpoint", "CKPT"], ("folder",)),
    (["-m", "toolkit.evaluate", "--recipe", "recipe.toml", "--checkpoint", "a-file"], ("a-file",)),
    (
        ["-m", "toolkit.data.preprocess", "--input", "folder", "--output-prefix", "out"],
        ("folder", "directory"),
    ),
    (
        ["-m", "toolkit.data.preprocess", "--input", "a-file", "--output-prefix", "a-file/x"],
        ("--output-prefix",),
    ),
    (["checkpoints_tools/inspect_checkpoint.py", "nope"], ("nope",)),
    (["checkpoints_tools/inspect_checkpoint.py", "a-file"], ("a-file",)),
    (["checkpoints_tools/reshard.py", "--in", "nope", "--out", "out"], ("nope",)),
    (["checkpoints_tools/reshard.py", "--in", "CKPT", "--out", "a-file"], ("--out", "a-file")),
    (
        ["checkpoints_tools/reshard.py", "--in", "CKPT", "--out", "out", "--tp", "3"],
        ("--tp 3", "parallel.tp", "divisible"),
    ),
    (["checkpoints_tools/export_hf.py", "--in", "nope", "--out", "out"], ("--in", "nope")),
    (["checkpoints_tools/export_hf.py", "--in", "CKPT", "--out", "a-file"], ("--out", "a-file")),
    (["launchers/serve.py", "--checkpoint", "nope"], ("nope",)),
    (["launchers/serve.py", "--checkpoint", "CKPT", "--port", "-5"], ("--port",)),
    (["launchers/serve.py", "--checkpoint", "CKPT", "--device", "bogus"], ("--device",)),
    (["launchers/serve.py", "--checkpoint", "CKPT", "--decode-buckets", "1,128"], ("--decode-b",)),
    (["launchers/serve.py", "--checkpoint", "CKPT", "--stream-wakes", "-1"], ("--stream-wakes",)),
    (["launchers/serve_slurm.py", "--checkpoint", "a-file", "--dry-run"], ("--checkpoint",)),
    (
        ["launchers/serve_slurm.py", "--checkpoint", "CKPT", "--time", "2h", "--dry-run"],
        ("--time",),
    ),
]


@pytest.mark.long  # make test-long (CI runs it)
@pytest.mark.parametrize(("args", "words"), TOOLS, ids=lambda v: " ".join(v)[:60])
def test_bad_flags_and_paths_of_the_other_tools(tmp_path, checkpoint, args, words):
    (tmp_path / "recipe.toml").write_text(RECIPE)
    (tmp_path / "a-file").write_text("not a checkpoint\n")
    (tmp_path / "folder").mkdir()
    before = {p.name for p in tmp_path.iterdir()}
    args = [str(checkpoint) if a == "CKPT" else a for a in args]
    if args[0].endswith(".py"):
        args[0] = str(ROOT / args[0])
    assert_refused(run(*args, cwd=tmp_path), tmp_path, before, *words)


@pytest.mark.long  # make test-long (CI runs it): 14 s
def test_a_layout_that_cannot_fit_the_gpus_is_refused_before_submission(tmp_path):
    """The 8B recipe planned against 40 GB GPUs (55.6 GB a rank at TP=4 + SP): refused, naming
    the largest term of the memory plan; the 80 GB it ships with passes."""
    recipe = str(ROOT / "recipes" / "8b_hybrid.toml")
    small = ["--set", "slurm.gpu_memory_gb=40", "--dry-run"]
    proc = run(SUBMIT, recipe, *small, cwd=tmp_path)
    assert_refused(proc, tmp_path, set(), "8b_hybrid.toml", "slurm.gpu_memory_gb", "activations")
    proc = run(SUBMIT, recipe, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("#!"), proc.stderr[-2000:]
