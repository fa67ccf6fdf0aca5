"""A real Slurm cluster on this host for the tests: munged, slurmctld and three slurmd (`slurmd -N
n1`, `-N n2`, `-N n3`), all under one temporary directory, stopped by their pid files. Jobs take
two nodes; the third is the spare that a job requeued after losing a node restarts on."""

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from toolkit.distributed import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
NODES = ("n1", "n2", "n3")


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
        for d in ("state", "log", *(f"spool/{node}" for node in NODES)):
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
        ctld = free_port()
        nodes = "\n".join(
            f"NodeName={node} NodeAddr=127.0.0.1 Port={free_port()} CPUs=2 RealMemory=4000 "
            "State=UNKNOWN"
            for node in NODES
        )
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
# A node whose slurmd stops answering is DOWN (its jobs requeued) within about 20 s, not 5 min;
# a live slurmd answers the pings in milliseconds.
SlurmdTimeout=5
MessageTimeout=5
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        subprocess.run([_sbin("slurmctld"), "-i"], env=self.env, check=True)
        for node in NODES:
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

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def job_state(self, job_id: str) -> str:
        return self.job_fields(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")

    def release(self, job_id: str, *fields: str) -> None:
        """Start a requeued job, once PENDING, without the hold Slurm puts on it, but not within
        the second of its requeue. slurmd launches a job again only with a credential newer, in
        whole seconds, than the kill of its last run; it refuses one launched within that second
        ("Job N already killed, do not launch batch job"), and slurmctld then ends the job FAILED
        before it has written a line ("Killing non-startable batch JobId=N: Job credential
        revoked"). Slurm's hold (the credential's lifetime) is its own guard against that; the
        next second is enough, as a PENDING job's requeue is done: the second after the requeue
        as slurmctld recorded it (the job's SubmitTime), not as a sleep to this clock's next
        second measures it, which a sleep ending a hair early or a slow `scontrol` can leave in
        the same second. (StartTime=now+1 would leave it to the backfill scheduler's next pass,
        up to 30 s.) `fields`: more KEY=VALUE to set."""
        requeued = self.job_fields(job_id)["SubmitTime"]  # local time, to the second
        while time.strftime("%Y-%m-%dT%H:%M:%S") <= requeued:
            time.sleep(0.05)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", *fields)

    def job_daemon_log(self, job_id: str) -> str:
        """What slurmctld and the slurmd logged about the job: why it ended as it did."""
        mention = re.compile(rf"(JobId=|[Jj]ob |\[){job_id}\b")
        lines = []
        for log in sorted((self.root / "log").glob("slurm*.log")):
            text = log.read_text(errors="replace").splitlines()
            lines += [f"{log.stem}: {line}" for line in text if mention.search(line)]
        return "\n".join(lines)

    def job_nodes(self, job_id: str) -> list[str]:
        """The nodes the job runs on (its latest allocation), the batch script's first."""
        nodelist = self.job_fields(job_id).get("NodeList", "")
        return self.run("scontrol", "show", "hostnames", nodelist).stdout.split()

    def processes(self, *marks: str) -> set[int]:
        """This cluster's processes on this host (daemons, step daemons, job scripts and tasks all
        have its SLURM_CONF in their environment) whose environment also holds every mark."""
        wanted = {f"SLURM_CONF={self.conf}".encode(), *(m.encode() for m in marks)}
        pids = set()
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and wanted <= set(
                    (proc / "environ").read_bytes().split(b"\0")
                ):
                    pids.add(int(proc.name))
            except OSError:
                pass  # gone meanwhile
        return pids

    def job_processes(self, job_id: str, node: str | None = None) -> set[int]:
        """The job's processes (on `node` only, if given), and the slurmstepd daemons above them."""
        marks = [f"SLURM_JOB_ID={job_id}"] + ([f"SLURMD_NODENAME={node}"] if node else [])
        pids = self.processes(*marks)
        for pid in list(pids):
            try:
                parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                if Path("/proc", parent, "cmdline").read_bytes().startswith(b"slurmstepd"):
                    pids.add(int(parent))
            except (OSError, ValueError):
                pass  # gone meanwhile
        return pids

    def lose_node(self, node: str, job_id: str) -> set[int]:
        """Take `node` away as a crash would: its slurmd and the job's step daemons and tasks there
        are all stopped first (none can tell another, or slurmctld, what happens next), then
        killed. Returns the pids killed."""
        pids = {
            int((self.root / f"slurmd-{node}.pid").read_text()),
            *self.job_processes(job_id, node),
        }
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        return pids

    def node_state(self, node: str) -> str:
        """IDLE, MIXED, DOWN+NOT_RESPONDING, ... (`scontrol show node`)."""
        out = self.run("scontrol", "show", "node", node).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f).get("State", "UNKNOWN")

    def start_node(self, node: str, timeout: float = 60) -> None:
        """Start `node`'s slurmd again and wait until slurmctld has it back in service
        (ReturnToService=2 returns a node that was DOWN for not responding)."""
        subprocess.run([_sbin("slurmd"), "-N", node], env=self.env, check=True)
        deadline = time.monotonic() + timeout
        out_of_service = {"DOWN", "NOT_RESPONDING", "UNKNOWN"}
        while out_of_service & set((state := self.node_state(node)).split("+")):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"node {node} still {state!r} {timeout} s after its slurmd started"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel the jobs and let them end (a step daemon whose slurmd and slurmctld are gone
        never exits), stop the daemons, then kill whatever of this cluster still runs."""
        self.run("scancel", "--full", "-u", "root")
        deadline = time.monotonic() + 45  # KillWait=30 for ranks that do not stop on SIGTERM
        while self.run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
        for name in (*(f"slurmd-{node}" for node in NODES), "slurmctld", "munged"):
            pid_file = self.root / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        deadline = time.monotonic() + 10
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
