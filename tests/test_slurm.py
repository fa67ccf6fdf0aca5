"""The Slurm launcher on a real two-node Slurm cluster (started on this host by the fixture)."""

import re
import subprocess
import sys
import time
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


def submitted(proc: subprocess.CompletedProcess, via: str = "submitit") -> str:
    assert proc.returncode == 0, proc.stderr
    return re.search(rf"submitted job (\d+) .*through {via}", proc.stdout).group(1)


def log_path(workdir: Path, job_id: str, via: str = "submitit") -> Path:
    """Rank 0's log: submitit writes one per task, our sbatch script one for the job."""
    name = f"{job_id}_0_log.out" if via == "submitit" else f"tiny_hybrid-{job_id}.out"
    return workdir / "runs" / "slurm" / name  # beside logging.dir = runs/tb


def finished_log(cluster, workdir: Path, job_id: str, via: str = "submitit") -> str:
    state = cluster.wait(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    assert state == "COMPLETED", (
        f"job {job_id} {state}:\n{cluster.job_daemon_log(job_id)}\n{task_logs(workdir, job_id)}"
    )
    return log_path(workdir, job_id, via).read_text()


def task_logs(workdir: Path, job_id: str, lines: int = 40) -> str:
    """The end of each of the job's own logs (every task's, stdout and stderr): what the ranks
    were doing when it failed, before the test's directory is cleaned away."""
    tails = []
    for log in sorted((workdir / "runs" / "slurm").glob(f"*{job_id}*")):
        if log.suffix in (".out", ".err"):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name} (last {lines} lines)\n" + "\n".join(text))
    return "\n".join(tails)


def wait_for(log: Path, pattern: str, after: int = 0, timeout: float = 120) -> None:
    """Until `pattern` (a regex) is in the log past its first `after` characters."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and re.search(pattern, log.read_text()[after:])):
        assert time.monotonic() < deadline, f"{pattern!r} not in {log} after {timeout} s"
        time.sleep(0.5)


def check_training(log: str, workdir: Path, steps: int) -> None:
    assert "layout: TP=1 PP=1 DP=2 on 2 ranks" in log  # one rank per node, found each other
    first, last = map(float, re.search(r"loss: step 1 ([\d.]+) -> step \d+ ([\d.]+)", log).groups())
    assert last < first - 1.0
    assert (workdir / "runs" / "ck" / "latest").read_text().strip() == f"step_{steps:08d}"


def test_submit_two_nodes_through_submitit(cluster, tmp_path):
    note = "--set", "slurm.env=['PYTORCH_HYBRID_NOTE=from the recipe']"
    proc = submit_run(cluster, tmp_path, "--set", "train.steps=8", *note)
    job_id = submitted(proc)
    log = log_path(tmp_path, job_id)
    assert f"log:      {log} (rank 0" in proc.stdout and f"squeue -j {job_id};" in proc.stdout
    check_training(finished_log(cluster, tmp_path, job_id), tmp_path, 8)
    assert "Job completed successfully" in log.with_name(f"{job_id}_1_log.out").read_text()
    script = log.with_name(f"{job_id}_submission.sh").read_text()  # submitit's, from our recipe
    assert "#SBATCH --signal=USR2@90" in script and "#SBATCH --requeue" in script
    assert "srun --unbuffered" in script and "--kill-on-bad-exit=1" in script
    # slurm.env: exported before srun, which hands the job's environment to every task.
    assert "export PYTORCH_HYBRID_NOTE='from the recipe'" in script
    printed = [p.read_text() for p in log.parent.glob(f"{job_id}_*.out")]
    assert any("PYTORCH_HYBRID_NOTE=from the recipe" in text for text in printed), printed
    status = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "status.py")],
        env=cluster.env,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if line.startswith(job_id + " "))
    assert row.split()[1:3] == ["tiny_hybrid", "COMPLETED"]
    assert "8/8" in row and "runs/ck/step_00000008" in row


@pytest.mark.long  # make test-long: make test keeps within 15 minutes
def test_emitted_script_runs_with_plain_sbatch(cluster, tmp_path):
    script = tmp_path / "job.sbatch"
    proc = submit_run(cluster, tmp_path, "--set", "train.steps=8", "--emit-sbatch", str(script))
    assert proc.returncode == 0, proc.stderr
    out = cluster.run("sbatch", "--parsable", str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    check_training(finished_log(cluster, tmp_path, out.stdout.strip(), "sbatch"), tmp_path, 8)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--via", "sbatch", "--partition", "nosuch"],
            "sbatch rejected the job: sbatch: error: invalid partition specified: nosuch",
        ),
        (["--partition", "nosuch"], "Slurm rejected the job: sbatch: error: invalid partition"),
        (
            ["--set", "slurm.gpus_per_node=4", "--set", "slurm.tasks_per_node=1"],
            "Invalid generic resource (gres) specification",
        ),  # these nodes have no GPUs
        # More than the partition holds: refused at once (EnforcePartLimits), not left pending.
        (["--nodes", "4", "--set", "train.micro_batch_size=4"], "Node count specification invalid"),
        (["--set", "slurm.cpus_per_task=64"], "More processors requested than permitted"),
        # Ours, before Slurm:
        (["--nodes", "3"], "16 is not divisible by micro_batch_size x DP = 24"),
        (["--time", "1:00"], "slurm.signal_delay_s: 90 s before a limit of 1:00 leaves no time"),
    ],
    ids=["partition-sbatch", "partition", "gpus", "nodes", "cpus", "batch", "time"],
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


@pytest.mark.long  # make test-long (CI runs it): 31 s; make test keeps within 15 minutes
def test_requeued_job_resumes_from_its_checkpoint(cluster, tmp_path):
    """Preemption: `scontrol requeue` SIGTERMs the ranks, which checkpoint at the next step (the
    trainer's handler, not submitit's, which would ignore SIGTERM) and exit; the requeued job
    resumes there. Every step runs exactly once across both runs."""
    steps = 16  # no periodic checkpoint before the end: the one resumed from is the signal's
    args = ["--set", f"train.steps={steps}", "--set", "checkpoint.interval=25"]
    job_id = submitted(submit_run(cluster, tmp_path, *args, "--set", "checkpoint.keep_last=0"))
    wait_for(log_path(tmp_path, job_id), f"step 6/{steps}")
    assert cluster.run("scontrol", "requeue", job_id).returncode == 0
    cluster.wait(job_id, ("PENDING",), timeout=60)
    cluster.release(job_id)
    text = finished_log(cluster, tmp_path, job_id)
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    assert 6 <= resumed_at < steps  # saved on the signal
    done = [int(s) for s in re.findall(rf"step (\d+)/{steps} loss", text)]
    assert sorted(done) == list(range(1, steps + 1)), done  # none twice, none skipped
    assert "restart 1" in text


def test_a_released_job_runs_again_after_its_requeue(cluster, tmp_path):
    """A job released right after its requeue runs again, rather than end FAILED without a line
    (slurmd refuses to launch it within the second its last run was killed in: see
    SlurmCluster.release). The requeue comes at the start of a second, so that a release within
    that second would be seen: the job eligible in the second its requeue was done."""
    log = tmp_path / "job.out"
    script = 'echo "restart ${SLURM_RESTART_COUNT:-0}"; sleep 300'
    sbatch = ["sbatch", "--parsable", "--nodes=2", "--requeue", "--open-mode=append"]
    job_id = cluster.run(*sbatch, f"--output={log}", "--wrap", script, cwd=tmp_path).stdout.strip()
    wait_for(log, "restart 0")
    time.sleep(1 - time.time() % 1)  # to the start of a second
    assert cluster.run("scontrol", "requeue", job_id).returncode == 0
    cluster.wait(job_id, ("PENDING",), timeout=60)
    cluster.release(job_id)
    try:
        job = cluster.job_fields(job_id)  # SubmitTime: when the requeue was done, to the second
        eligible, requeued = job["EligibleTime"], job["SubmitTime"]
        assert eligible > requeued, f"eligible at {eligible}, requeued at {requeued}"
        state = cluster.wait(job_id, ("RUNNING", "FAILED", "CANCELLED"))
        assert state == "RUNNING", f"job {job_id} {state}:\n{cluster.job_daemon_log(job_id)}"
        wait_for(log, "restart 1")
    finally:
        cluster.run("scancel", job_id)
        cluster.wait(job_id, ("CANCELLED", "FAILED", "COMPLETED"), timeout=60)


@pytest.mark.long  # make test-long: make test keeps within 15 minutes
def test_timeouts_stop_requeueing_after_max_num_timeout(cluster, tmp_path):
    """slurm.max_num_timeout=1: the first timeout requeues the job, the second ends it.

    Slurm sends --signal up to 60 s early, so a job submitted with a limit short enough for a
    test could be signalled while still starting (and USR2 would kill it there). Instead the
    running job's limit is cut to two minutes once it trains: the first time, Slurm's own USR2
    follows (at its next limit check, within 30 s); the second time the test sends it
    (`scancel --signal=USR2`) rather than wait. Either way the trainer finds less than
    signal_delay_s + 60 s left: a timeout."""
    job_id = submitted(
        submit_run(
            cluster, tmp_path, "--set", "train.steps=1000", "--set", "slurm.max_num_timeout=1"
        )
    )
    log = log_path(tmp_path, job_id)
    wait_for(log, "step 3/1000")
    cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=2")
    cluster.wait(job_id, ("PENDING",), timeout=60)  # USR2, checkpoint, requeue
    first = log.read_text()
    assert "timeout 1 of slurm.max_num_timeout=1" in first and "requeued Slurm job" in first
    cluster.release(job_id, "TimeLimit=10")
    wait_for(log, r"resumed from[\s\S]*step \d+/1000 loss", after=len(first))
    cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=2")
    cluster.run("scancel", "--signal=USR2", job_id)
    assert cluster.wait(job_id, ("FAILED", "COMPLETED", "PENDING", "TIMEOUT")) == "FAILED"
    assert "(00:02:00) 2 times, more than slurm.max_num_timeout=1: not requeued" in log.read_text()
    assert log.with_name(f"{job_id}.timeouts").read_text() == "2\n"


@pytest.mark.parametrize(
    "via",
    ["submitit", pytest.param("sbatch", marks=pytest.mark.long)],  # test-long: 20 s
)
def test_chained_jobs_continue_one_run(cluster, tmp_path, via):
    proc = submit_run(cluster, tmp_path, "--via", via, "--chain", "2", "--set", "train.steps=2")
    first = submitted(proc, via)
    second = re.search(r"then (\d+) in a chain", proc.stdout).group(1)
    assert f"log:      {log_path(tmp_path, first, via)}" in proc.stdout
    finished_log(cluster, tmp_path, first, via)
    text = finished_log(cluster, tmp_path, second, via)
    assert "resumed from" in text and "at step 2" in text  # the second job found the run done
    assert not re.search(r"step \d+/2 loss", text)


def tensorboard_losses(event_file: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_file))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


@pytest.mark.long
def test_lost_node_requeues_and_resumes_from_last_checkpoint(cluster, tmp_path):
    """A node lost mid-job: the second node's slurmd, step daemon and rank are killed at once.
    Rank 0 fails at its next collective, slurmctld declares the node DOWN after SlurmdTimeout and
    requeues the job, which restarts on the other two nodes and resumes from the last published
    checkpoint: the steps since it run again with the same losses, none is skipped."""
    steps = 16
    sets = {"train.steps": steps, "checkpoint.interval": 4, "checkpoint.keep_last": 0}
    sets |= {"train.global_batch_size": 4, "train.micro_batch_size": 2}  # short steps
    args = [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]
    job_id = submitted(submit_run(cluster, tmp_path, *args))
    log, ckpts = log_path(tmp_path, job_id), tmp_path / "runs" / "ck"
    wait_for(log, f"step 5/{steps} loss")  # past the checkpoint of step 4
    lost = cluster.job_nodes(job_id)[1]  # the first would take rank 0's log with it
    try:
        cluster.lose_node(lost, job_id)
        assert cluster.wait(job_id, ("PENDING", "FAILED", "COMPLETED", "NODE_FAIL")) == "PENDING"
        deadline = time.monotonic() + 60  # Slurm ends what is left of the run
        while left := cluster.job_processes(job_id):
            assert time.monotonic() < deadline, f"job {job_id} still runs {left}"
            time.sleep(0.5)
        first = log.read_text()
        assert f"srun: error: Node failure on {lost}" in first
        assert "Restarts=1" in cluster.run("scontrol", "show", "job", job_id).stdout
        # Only published checkpoints are named; a save cut short stays a .tmp- directory.
        latest = (ckpts / "latest").read_text().strip()
        published = sorted(p.name for p in ckpts.glob("step_*"))
        assert latest == published[-1] and latest >= "step_00000004", published
        assert all(p.name.startswith((".tmp-step_", ".latest")) for p in ckpts.glob(".*"))

        cluster.release(job_id)
        text = finished_log(cluster, tmp_path, job_id)[len(first) :]  # appended to the same log
        assert lost not in cluster.job_nodes(job_id)
    finally:
        cluster.start_node(lost)  # for the tests after this one
    assert "restart 1" in text
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    assert f"step_{resumed_at:08d}" == latest
    before = dict(re.findall(rf"step (\d+)/{steps} loss ([\d.]+)", first))
    after = dict(re.findall(rf"step (\d+)/{steps} loss ([\d.]+)", text))
    assert sorted(map(int, after)) == list(range(resumed_at + 1, steps + 1))  # nothing skipped
    repeated = sorted(set(before) & set(after), key=int)
    assert len(repeated) >= 5 - resumed_at and all(before[s] == after[s] for s in repeated)
    # Exactly, not to four decimals: the float32 losses of both runs in TensorBoard.
    events = sorted((tmp_path / "runs" / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 2
    lost_run, resumed = (tensorboard_losses(e) for e in events)
    assert all(lost_run[int(s)] == resumed[int(s)] for s in repeated)
