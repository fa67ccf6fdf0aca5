"""This toolkit's Slurm jobs: state, last step and loss, last checkpoint (read from each job's log).

    python launchers/status.py [--all-users]

Without slurmdbd there is no sacct, so jobs come from `squeue -t all` (Slurm keeps finished jobs
for MinJobAge seconds) and `scontrol show job`.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

from toolkit.slurm import MARKER, no_slurm_here

# Runs started with --local are no Slurm jobs: say where their progress is instead.
LOCAL_RUNS = (
    "run this on a Slurm login node; a run started with `submit.py --local` logs to its "
    "terminal and to TensorBoard (logging.dir)"
)


class SlurmUnavailable(Exception):
    """No usable Slurm here (exit status 2), or a Slurm command failed (1)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def slurm(*cmd: str) -> str:
    no_slurm = no_slurm_here(cmd[0], advice=LOCAL_RUNS)
    if no_slurm:
        raise SlurmUnavailable(no_slurm, 2)
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        no_slurm = no_slurm_here(cmd[0], done.stderr, advice=LOCAL_RUNS)
        if no_slurm:
            raise SlurmUnavailable(no_slurm, 2)
        raise SlurmUnavailable(f"{' '.join(cmd)} failed: {done.stderr.strip()}", 1)
    return done.stdout


def job_fields(job_id: str) -> dict[str, str]:
    text = slurm("scontrol", "show", "job", job_id)
    return dict(f.split("=", 1) for f in text.split() if "=" in f)


def progress(log: Path) -> tuple[str, str, str]:
    """(step, loss, checkpoint) from a training log; '-' where not known yet."""
    if not log.is_file():
        return "-", "-", "-"
    text = log.read_text(errors="replace")
    steps = re.findall(r"step (\d+/\d+) loss ([\d.naninf]+)", text)
    saved = re.findall(r"saved checkpoint (\S+)", text)
    step, loss = steps[-1] if steps else ("-", "-")
    return step, loss, saved[-1] if saved else "-"


def toolkit_jobs(queue: str) -> list[tuple[str, ...]]:
    """A row per job of ours in squeue's output: the job's state, then its progress from its log."""
    rows = []
    for line in queue.splitlines():
        job_id, name, state, elapsed, nodes = line.split("|")
        fields = job_fields(job_id)
        script = Path(fields.get("Command", ""))
        if not (script.is_file() and MARKER in script.read_text(errors="replace")):
            continue  # not one of ours
        step, loss, ckpt = progress(Path(fields.get("StdOut", "")))
        rows.append((job_id, name, state, elapsed, nodes, step, loss, ckpt))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launchers/status.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--all-users", action="store_true", help="not only your own jobs")
    args = parser.parse_args(argv)
    cmd = ["squeue", "-h", "-t", "all", "-o", "%i|%j|%T|%M|%D"]
    if not args.all_users:
        cmd.append("--me")
    try:
        rows = toolkit_jobs(slurm(*cmd))
    except SlurmUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    header = ("JOBID", "NAME", "STATE", "TIME", "NODES", "STEP", "LOSS", "CHECKPOINT")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    if not rows:
        print("(no toolkit jobs in the queue)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
