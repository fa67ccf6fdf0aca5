"""The Slurm launcher on a real two-node Slurm cluster (started on this host by the fixture)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, missing_binaries

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_hybrid.toml"
CPU_OVERRIDES = [
    "slurm.gpus_per_node=0",
    "slurm.cpus_per_task=1",
    "slurm.exclusive=false",
    'slurm.time="00:10:00"',
    "parallel.dp=-1",
    "train.micro_batch_size=8",
    'train.sample_prompt=""',
    "logging.interval=1",
]
CPU_JOB = [arg for o in CPU_OVERRIDES for arg in ("--set", o)]

pytestmark = pytest.mark.skipif(
    bool(missing_binaries()),
    reason=f"Slurm binaries not installed ({', '.join(missing_binaries())}); .ci/run installs them",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(cluster, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "submit.py"), str(RECIPE), *args],
        cwd=workdir,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def submit_run(cluster, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """A two-node CPU run of the tiny recipe writing under workdir/runs."""
    dirs = ["--set", 'checkpoint.dir="runs/ck"', "--set", 'logging.dir="runs/tb"']
    return submit(cluster, workdir, "--nodes", "2", *CPU_JOB, *dirs, *args)


def finished_log(cluster, workdir: Path, job_id: str) -> str:
    assert cluster.wait(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")) == "COMPLETED"
    return (workdir / "runs" / "tiny_hybrid" / "slurm" / f"tiny_hybrid-{job_id}.out").read_text()


def check_training(log: str, workdir: Path, steps: int) -> None:
    assert "layout: TP=1 PP=1 DP=2 on 2 ranks" in log  # one rank per node, found each other
    first, last = map(float, re.search(r"loss: step 1 ([\d.]+) -> step \d+ ([\d.]+)", log).groups())
    assert last < first - 1.0
    assert (workdir / "runs" / "ck" / "latest").read_text().strip() == f"step_{steps:08d}"


def test_submit_two_nodes(cluster, tmp_path):
    proc = submit_run(cluster, tmp_path, "--set", "train.steps=12")
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    assert f"tiny_hybrid-{job_id}.out" in proc.stdout and "squeue -j" in proc.stdout
    check_training(finished_log(cluster, tmp_path, job_id), tmp_path, 12)
    status = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "status.py")],
        env=cluster.env,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if line.startswith(job_id + " "))
    assert row.split()[1:3] == ["tiny_hybrid", "COMPLETED"]
    assert "12/12" in row and "runs/ck/step_00000012" in row


def test_emitted_script_runs_with_plain_sbatch(cluster, tmp_path):
    script = tmp_path / "job.sbatch"
    proc = submit_run(cluster, tmp_path, "--set", "train.steps=12", "--emit-sbatch", str(script))
    assert proc.returncode == 0, proc.stderr
    out = cluster.run("sbatch", "--parsable", str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    check_training(finished_log(cluster, tmp_path, out.stdout.strip()), tmp_path, 12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partition", "nosuch"], "invalid partition specified: nosuch"),
        (
            ["--set", "slurm.gpus_per_node=4", "--set", "slurm.tasks_per_node=1"],
            "sbatch rejected the job",
        ),  # these nodes have no GPUs
        (["--nodes", "3"], "16 is not divisible by micro_batch_size x DP = 24"),  # ours, first
    ],
    ids=["partition", "gpus", "batch"],
)
def test_bad_submissions_fail_clearly(cluster, tmp_path, args, message):
    proc = submit(cluster, tmp_path, *CPU_JOB, *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_missing_recipe_fails_before_slurm(cluster, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "submit.py"), "recipes/nope.toml"],
        cwd=tmp_path,
        env=cluster.env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "no such recipe file" in proc.stderr


def test_requeued_job_resumes_from_its_checkpoint(cluster, tmp_path):
    """Preemption: `scontrol requeue` SIGTERMs the ranks, which checkpoint at the next step and
    exit; the requeued job resumes there. Every step runs exactly once across both runs."""
    import time

    steps = 60
    proc = submit_run(
        cluster,
        tmp_path,
        "--set",
        f"train.steps={steps}",
        "--set",
        "checkpoint.interval=25",
        "--set",
        "checkpoint.keep_last=0",
    )
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    log = tmp_path / "runs" / "tiny_hybrid" / "slurm" / f"tiny_hybrid-{job_id}.out"
    deadline = time.monotonic() + 120
    while not (log.exists() and f"step 12/{steps}" in log.read_text()):
        assert time.monotonic() < deadline, "the job did not reach step 12"
        time.sleep(0.5)
    assert cluster.run("scontrol", "requeue", job_id).returncode == 0
    cluster.wait(job_id, ("PENDING",), timeout=60)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")  # skip the hold
    text = finished_log(cluster, tmp_path, job_id)
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    assert 12 <= resumed_at < 25  # saved on the signal, not at the periodic checkpoint
    done = [int(s) for s in re.findall(rf"step (\d+)/{steps} loss", text)]
    assert sorted(done) == list(range(1, steps + 1)), done  # none twice, none skipped
    assert "restart 1" in text


def test_chained_jobs_continue_one_run(cluster, tmp_path):
    proc = submit_run(cluster, tmp_path, "--chain", "2", "--set", "train.steps=6")
    assert proc.returncode == 0, proc.stderr
    first, second = re.search(r"submitted job (\d+) .*then (\d+) in a chain", proc.stdout).groups()
    finished_log(cluster, tmp_path, first)
    text = finished_log(cluster, tmp_path, second)
    assert "resumed from" in text and "at step 6" in text  # the second job found the run done
    assert not re.search(r"step \d+/6 loss", text)
