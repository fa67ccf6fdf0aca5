"""Serving from Slurm: the rendered sbatch script (golden file), input checks, and a real job on
a real one-host Slurm cluster that serves a tiny checkpoint over two TP ranks."""

import http.client
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import test_server
from tests.slurm_cluster import SlurmCluster, missing_binaries

ROOT = Path(__file__).resolve().parents[1]
checkpoint = test_server.checkpoint  # the tiny hybrid's checkpoint (a fixture)
GOLDEN = ROOT / "tests" / "golden" / "serve_tp2_pyxis.sbatch"


def serve_slurm(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launchers/serve_slurm.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_matches_the_golden_script(checkpoint, tmp_path):
    """A 2-GPU TP job in a pyxis container; machine-specific paths become placeholders."""
    done = serve_slurm(
        "--checkpoint",
        str(checkpoint.parent),  # the root: the script names the step it found
        "--tp",
        "2",
        "--partition",
        "gpu",
        "--account",
        "lm",
        "--time",
        "2:00:00",
        "--exclusive",
        "--container-image",
        "nvcr.io#nvidia/pytorch:24.05-py3",
        "--container-mounts",
        "/data:/data,/scratch:/scratch",
        "--dry-run",
        "--",
        "--slots",
        "32",
        "--dtype",
        "bfloat16",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    script = (
        done.stdout.replace(str(checkpoint.resolve()), "CHECKPOINT")
        .replace(str(tmp_path.resolve()), "WORKDIR")
        .replace(str(ROOT), "ROOT")
    )
    assert script == GOLDEN.read_text()


def test_cpu_job_script(checkpoint, tmp_path):
    done = serve_slurm(
        "--checkpoint", str(checkpoint), "--gpus", "0", "--tp", "2", "--dry-run", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "#SBATCH --ntasks-per-node=2" in lines
    assert not any("gpus" in line or "--signal" in line or "--requeue" in line for line in lines)
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun.startswith(f"srun --kill-on-bad-exit=1 --cpu-bind=none {sys.executable} ")
    assert f"--checkpoint {checkpoint.resolve()} --tp 2 --host 0.0.0.0 --port 0" in srun
    assert srun.endswith('--address-file "$ADDRESS_FILE"')


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tp", "3"], "not divisible by TP=3"),
        (["--tp", "4", "--gpus", "2"], "each rank needs its own GPU"),
        (["--time", "soon"], "error: --time: 'soon' is not a Slurm time"),
        (["--partition", "gpu\nrm -rf ~"], "error: --partition: 'gpu\\nrm -rf ~' holds a control"),
        (["--job-name", "../x"], "error: --job-name: '../x' must be one path component"),
    ],
)
def test_bad_jobs_are_refused_before_submission(checkpoint, tmp_path, args, message):
    done = serve_slurm("--checkpoint", str(checkpoint), *args, "--dry-run", cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr


def test_missing_checkpoint_is_refused(tmp_path):
    done = serve_slurm("--checkpoint", str(tmp_path / "none"), "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and "--checkpoint" in done.stderr


@pytest.mark.skipif(
    bool(missing_binaries()),
    reason=f"Slurm binaries not installed ({', '.join(missing_binaries())}); .ci/run installs them",
)
@pytest.mark.long  # make test-long (CI runs it): a real Slurm job, 11 s
def test_real_slurm_job_serves_and_cancels(checkpoint, tmp_path):
    (tmp_path / "slurm").mkdir()
    cluster = SlurmCluster(tmp_path / "slurm").start()
    try:
        workdir = tmp_path / "work"
        workdir.mkdir()
        done = serve_slurm(
            "--checkpoint",
            str(checkpoint),
            *("--tp", "2", "--gpus", "0", "--cpus-per-task", "1", "--time", "00:05:00"),
            *("--run-dir", "runs/serve", "--", "--dtype", "float32", "--slots", "2"),
            cwd=workdir,
            env=cluster.env,
        )
        assert done.returncode == 0, done.stderr
        job = re.search(r"submitted job (\d+)", done.stdout).group(1)
        address = workdir / "runs" / "serve" / f"serve-{job}.json"
        log = workdir / "runs" / "serve" / f"serve-{job}.out"
        assert str(address) in done.stdout and str(log) in done.stdout
        deadline = time.monotonic() + 50
        while not address.exists():
            state = cluster.job_state(job)
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), (state, log.read_text())
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.3)
        info = json.loads(address.read_text())
        assert info["slurm_job_id"] == job
        # Written once it listens; /health says when it is warm (503 "starting" until then).
        while True:
            conn = http.client.HTTPConnection(info["host"], info["port"], timeout=30)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        conn.close()
        conn = http.client.HTTPConnection(info["host"], info["port"], timeout=30)
        body = {"prompts": ["def f"], "tokens_to_generate": 4, "top_k": 1}
        conn.request("PUT", "/api", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200
        assert json.loads(reply.read())["text"][0].startswith("def f")
        conn.close()
        text = log.read_text()
        assert f"serving on http://0.0.0.0:{info['port']}" in text
        assert "loaded TP shard 0/2" in text  # two srun tasks, one TP rank each
        cluster.run("scancel", job)
        assert cluster.wait(job, ("CANCELLED", "COMPLETED", "FAILED"), timeout=40) == "CANCELLED"
        deadline = time.monotonic() + 30
        while address.exists():  # the server stopped cleanly: it removes its address
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        cluster.stop()
