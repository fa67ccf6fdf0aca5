"""A real two-node Slurm cluster on this host for the tests: munged, slurmctld and two slurmd
(`slurmd -N n1`, `-N n2`), all under one temporary directory, stopped by their pid files."""

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from toolkit.distributed import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "SlurmCluster":
        r = self.root
        r.chmod(0o700)  # munged refuses group- or world-writable directories
        for d in ("state", "spool/n1", "spool/n2", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge.sock"
        subprocess.run(
            [
                _sbin("munged"),
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={r}/munged.pid",
                f"--log-file={r}/log/munged.log",
                f"--seed-file={r}/munged.seed",
                "--force",
            ],
            check=True,
        )
        ctld, p1, p2 = free_port(), free_port(), free_port()
        # Job ids from a random start: the ranks' rendezvous port comes from the job id, and two
        # test clusters on one host (parallel test runs) would otherwise both start at job 1.
        self.conf.write_text(
            f"""ClusterName=toolkit
SlurmctldHost={socket.gethostname()}
SlurmctldPort={ctld}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmUser=root
SlurmdUser=root
ReturnToService=2
JobRequeue=1
FirstJobId={random.randrange(1, 20000)}
# A job no partition can hold (too many nodes, CPUs) is refused at submission, not left pending
EnforcePartLimits=ALL
MinJobAge=600
KillWait=30
NodeName=n1 NodeAddr=127.0.0.1 Port={p1} CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port={p2} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""
        )
        subprocess.run([_sbin("slurmctld"), "-i"], env=self.env, check=True)
        for node in ("n1", "n2"):
            subprocess.run([_sbin("slurmd"), "-N", node], env=self.env, check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t").stdout.split()
            if out and all(state == "idle" for state in out):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm did not come up: {self.run('sinfo').stdout}")

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, **kw)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("JobState", "UNKNOWN")

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")

    def stop(self) -> None:
        self.run("scancel", "--full", "-u", "root")
        for name in ("slurmd-n1", "slurmd-n2", "slurmctld", "munged"):
            pid_file = self.root / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(0.5)
