"""The job scripts for a recipe against golden files, and the requeue rule (no Slurm needed)."""

import os
from pathlib import Path

import pytest

from toolkit.config import SlurmConfig, load_recipe
from toolkit.slurm import (
    log_dir,
    render_sbatch,
    requeue_after_signal,
    slurm_seconds,
    submitit_parameters,
)

GOLDEN = Path(__file__).parent / "golden"
RECIPE = Path(__file__).parents[1] / "recipes" / "8b_hybrid.toml"
OVERRIDES = [
    'slurm.container_image="nvcr.io#nvidia/pytorch:25.01-py3"',
    'slurm.container_mounts=["/lustre/data:/data"]',
    'slurm.partition="batch"',
    'slurm.account="llm"',
]


def test_8b_hybrid_script_matches_the_golden_file():
    recipe = load_recipe(RECIPE, OVERRIDES)
    script = render_sbatch(
        recipe,
        "/work/recipes/8b_hybrid.toml",
        OVERRIDES,
        python="python3",
        workdir="/work",
        log_dir=log_dir(recipe, "/work"),
    )
    assert script == (GOLDEN / "8b_hybrid_pyxis.sbatch").read_text()
    # '#' in an #SBATCH line would start a comment; in the srun line it is just text.
    assert "#SBATCH --ntasks-per-node=8" in script and "--signal=USR2@90" in script
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in script


def test_submitit_script_matches_the_golden_file():
    """The script submitit writes from our parameters (its own renderer, which SlurmExecutor
    calls at submission): the same job as the sbatch script, with extra_sbatch lines by name."""
    from submitit.slurm.slurm import _make_sbatch_string

    overrides = [*OVERRIDES, 'slurm.extra_sbatch=["--reservation=r1", "--overcommit"]']
    params = submitit_parameters(
        load_recipe(RECIPE, overrides), "/work/recipes/8b_hybrid.toml", workdir="/work"
    )
    folder = "/work/runs/8b_hybrid/slurm"
    command = f"python3 -u -m submitit.core._submit {folder}"
    script = _make_sbatch_string(command=command, folder=folder, **params)
    assert script == (GOLDEN / "8b_hybrid_pyxis.submitit.sh").read_text()


@pytest.mark.parametrize(
    ("logging_dir", "expected"),
    [
        ("runs/8b_hybrid/tensorboard", "/work/runs/8b_hybrid/slurm"),  # the shipped recipes
        ("/lustre/me/exp1/tb", "/lustre/me/exp1/slurm"),  # outputs elsewhere: logs with them
        ("tb", "/work/slurm"),
    ],
)
def test_slurm_logs_go_beside_the_runs_other_outputs(logging_dir, expected):
    recipe = load_recipe(RECIPE, [f"logging.dir={logging_dir!r}"])
    assert log_dir(recipe, "/work") == Path(expected)
    script = render_sbatch(
        recipe, RECIPE, [], python="python3", workdir="/work", log_dir=log_dir(recipe, "/work")
    )
    assert f"#SBATCH --output={expected}/%x-%j.out" in script


def test_submit_dry_run_puts_the_log_beside_logging_dir(tmp_path):
    """Not runs/NAME/slurm under the working directory when logging.dir points elsewhere."""
    import subprocess
    import sys

    elsewhere = tmp_path / "scratch" / "exp1"
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parents[1] / "launchers" / "submit.py"),
            str(RECIPE),
            "--dry-run",
            "--set",
            f"logging.dir='{elsewhere}/tensorboard'",
            "--set",
            f"checkpoint.dir='{elsewhere}/checkpoints'",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"#SBATCH --output={elsewhere}/slurm/%x-%j.out" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # --dry-run creates nothing


def test_apptainer_image_runs_python_inside_apptainer():
    overrides = ['slurm.container_image="/images/toolkit.sif"', 'slurm.container_mounts=["/d:/d"]']
    script = render_sbatch(
        load_recipe(RECIPE, overrides),
        RECIPE,
        [],
        python="python3",
        workdir="/work",
        log_dir="/work/runs",
    )
    srun = script.splitlines()[-1]
    assert srun.startswith("srun --kill-on-bad-exit=1 --cpu-bind=none apptainer exec --nv ")
    assert "--bind /d:/d --pwd /work /images/toolkit.sif python3 -m toolkit.train" in srun
    assert "--container-image" not in script  # that is pyxis


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("1:30", 90), ("04:00:00", 14400), ("2-1", 176400), ("1-00:00:05", 86405)],
)
def test_slurm_times(text, seconds):
    assert slurm_seconds(text) == seconds
    assert slurm_seconds("UNLIMITED") is None
    with pytest.raises(ValueError, match="is not a Slurm time"):
        slurm_seconds("2h")


def test_only_timeouts_count_against_max_num_timeout(tmp_path, monkeypatch):
    """USR2 near the limit is a timeout, counted next to the job's log; one with time left (a
    preemption) is not. One timeout is allowed here: the second ends the job unrequeued."""
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(  # `show job` prints tmp_path/job; other calls are logged
        f'#!/bin/sh\n[ "$1" = show ] && exec cat {tmp_path}/job\necho "$@" >> {tmp_path}/log\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    s = SlurmConfig(time="00:10:00", signal_delay_s=90, max_num_timeout=1)
    job = tmp_path / "job"
    fields = f"JobId=5 TimeLimit=00:10:00 StdOut={tmp_path}/logs/5_0_log.out RunTime="
    (tmp_path / "logs").mkdir()
    job.write_text(fields + "00:02:00\n")  # preempted: 8 minutes left
    assert requeue_after_signal(s, "5") is None
    assert not (tmp_path / "logs" / "5.timeouts").exists()
    job.write_text(fields + "00:08:35\n")  # 85 s left: the pre-timeout signal
    assert requeue_after_signal(s, "5") is None
    assert (tmp_path / "logs" / "5.timeouts").read_text() == "1\n"
    assert (tmp_path / "log").read_text() == "requeue 5\n" * 2
    refused = requeue_after_signal(s, "5")
    assert "reached its time limit (00:10:00) 2 times, more than slurm.max_num_timeout=1" in refused
    assert (tmp_path / "log").read_text() == "requeue 5\n" * 2  # not a third time


def test_podman_engine_runs_each_rank_in_podman_with_the_workdir_and_the_jobs_variables():
    overrides = [
        'slurm.container_image="localhost/hybrid-toolkit:0.1.0-cpu"',
        'slurm.container_engine="podman"',
        'slurm.container_mounts=["/d:/data"]',
    ]
    script = render_sbatch(
        load_recipe(RECIPE, overrides),
        "/work/recipes/8b_hybrid.toml",
        [],
        python="python3",
        workdir="/work",
        log_dir="/work/runs",
    )
    srun = script.splitlines()[-1]
    user = "--user=0:0" if os.getuid() == 0 else "--userns=keep-id"
    assert srun.startswith(
        f"srun --kill-on-bad-exit=1 --cpu-bind=none podman run --rm --network=host --ipc=host "
        f"{user} --volume=/work:/work --workdir=/work --volume=/d:/data '--env=SLURM_*' "
    )
    assert "--env=MASTER_ADDR --env=MASTER_PORT" in srun
    # torch's allocator and compile-cache settings reach the ranks, as they do outside podman.
    for prefix in ("PYTORCH", "TORCHINDUCTOR", "TRITON"):
        assert f"'--env={prefix}_*'" in srun
    assert srun.endswith(
        "--device=nvidia.com/gpu=all localhost/hybrid-toolkit:0.1.0-cpu python3 -m toolkit.train "
        "/work/recipes/8b_hybrid.toml"
    )
    assert "--container-image" not in script and "apptainer" not in script
    # scontrol is not in the image: the script finds the rendezvous before srun.
    assert (
        script.index("export MASTER_ADDR=")
        < script.index("export MASTER_PORT=")
        < len(script) - len(srun)
    )


def test_podman_engine_rendezvous_lines_find_the_first_nodes_address(tmp_path, monkeypatch):
    """The script's own lines, run by bash against a stand-in scontrol, give the address and
    port slurm_rendezvous would (the real cluster runs them in test_container_image.py)."""
    import subprocess

    from toolkit.distributed import slurm_rendezvous
    from toolkit.slurm import PODMAN_RENDEZVOUS

    fake = tmp_path / "scontrol"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$2" = hostnames ]; then printf "n7\\nn8\\n"; exit; fi\n'
        'echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=10.1.2.3 NodeHostName=$3"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")  # for slurm_rendezvous too
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_NODELIST": "n[7-8]", "SLURM_JOB_ID": "4242"}
    lines = ["set -euo pipefail", *PODMAN_RENDEZVOUS, 'echo "$MASTER_ADDR $MASTER_PORT"']
    out = subprocess.run(
        ["bash", "-c", "\n".join(lines)], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == list(slurm_rendezvous(env)) == ["10.1.2.3", "19242"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['slurm.container_engine="docker"'], "slurm.container_engine: 'docker' is not one of"),
        (['slurm.container_engine="podman"'], "slurm.container_engine: 'podman' needs"),
    ],
)
def test_bad_container_engine_is_refused(overrides, message):
    from toolkit.config import RecipeError

    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, overrides)


def test_the_recipes_environment_reaches_every_rank_literally(tmp_path):
    """slurm.env: exported by the job script before srun, each value as written (spaces, `$`
    and quotes reach the rank unexpanded), and named to podman, whose tasks see only what
    they are given."""
    import subprocess

    env = ["PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", "MY_NOTE=it's $HOME, 2 words"]
    recipe = load_recipe(RECIPE, [f"slurm.env={env!r}"])
    script = render_sbatch(recipe, "/w/r.toml", [], python="python3", workdir=tmp_path,
                           log_dir=tmp_path)  # fmt: skip
    exports = [line for line in script.splitlines() if line.startswith("export ")]
    shown = "\n".join([*exports, 'printf "%s|%s" "$PYTORCH_CUDA_ALLOC_CONF" "$MY_NOTE"'])
    out = subprocess.run(["bash", "-c", shown], capture_output=True, text=True, check=True)
    assert out.stdout == "expandable_segments:True|it's $HOME, 2 words"
    assert script.index("export MY_NOTE=") < script.index("\nsrun ")
    podman_sets = ['slurm.container_image="img"', 'slurm.container_engine="podman"']
    podman = load_recipe(RECIPE, [f"slurm.env={env!r}", *podman_sets])
    srun = render_sbatch(podman, "/w/r.toml", [], python="python3", workdir=tmp_path,
                         log_dir=tmp_path).splitlines()[-1]  # fmt: skip
    assert "--env=PYTORCH_CUDA_ALLOC_CONF --env=MY_NOTE " in srun


def test_the_recipes_environment_reaches_local_ranks(tmp_path, monkeypatch, capsys):
    """--local: the dry run shows slurm.env before the command, and each rank process gets it
    (the rank here a stand-in that writes what it sees)."""
    import sys

    import toolkit.cli.submit as submit

    recipe = tmp_path / "r.toml"
    recipe.write_text(Path(__file__).parents[1].joinpath("recipes/tiny_hybrid.toml").read_text())
    sets = ["--set", "slurm.env=['MY_NOTE=two words']"]
    assert submit.main([str(recipe), "--local", "--dry-run", *sets]) == 0
    assert "would run here (1 process): 'MY_NOTE=two words' " in capsys.readouterr().out
    seen = tmp_path / "seen"
    write = f"import os, sys; open({str(seen)!r} + os.environ['RANK'], 'w').write(os.environ['MY_NOTE'])"
    monkeypatch.setattr(
        submit, "train_command", lambda recipe, overrides: [sys.executable, "-c", write]
    )
    assert submit.run_local_processes(str(recipe), [], 2, {"MY_NOTE": "two words"}) == 0
    assert [(tmp_path / f"seen{r}").read_text() for r in (0, 1)] == ["two words"] * 2
