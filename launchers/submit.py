#!/usr/bin/env python3
"""Run a recipe as a Slurm job (through submitit, or sbatch), or on this machine (--local).

    python launchers/submit.py recipes/8b_hybrid.toml [--nodes 4 --time 2:00:00] [--dry-run]
    python launchers/submit.py recipes/8b_hybrid.toml --via sbatch
    python launchers/submit.py recipes/8b_hybrid.toml --emit-sbatch job.sbatch

    python launchers/submit.py recipes/tiny_hybrid.toml --local [--set train.steps=50]
    python launchers/submit.py recipes/tiny_hybrid.toml --local --nproc 2 --set parallel.tp=2

With --nproc N, N processes (gloo on CPUs, NCCL on GPUs) run the recipe's TP x PP x DP layout.
--local exits with status 3 when a signal (SIGTERM) stopped the run before its last step: its
checkpoint is saved, and the same command resumes it.
"""

import argparse
import contextlib
import functools
import io
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from toolkit.config import Recipe, RecipeError, load_recipe, validate  # noqa: E402
from toolkit.distributed import free_port  # noqa: E402
from toolkit.slurm import (  # noqa: E402
    TrainTask,
    check_job,
    python_command,
    render_sbatch,
    submitit_parameters,
    tasks_per_node,
)
from toolkit.train import add_recipe_arguments, run  # noqa: E402


def run_local_processes(recipe: str, overrides: list[str], nproc: int) -> int:
    """Start nproc ranks of `python -m toolkit.train` here; if one fails, stop the others.
    SIGTERM and SIGUSR2 are passed on to the ranks, which save a checkpoint at their next step
    boundary and stop: exit status STOPPED when they stopped before the last step."""
    from toolkit.train import STOPPED

    port = str(free_port())
    sets = [a for o in overrides for a in ("--set", o)]
    procs: list[subprocess.Popen] = []

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    handlers = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    for rank in range(nproc):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "toolkit.train", recipe, *sets, f"--stopped-status={STOPPED}"]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0, STOPPED)]
            if failed:
                stop_all(procs)
                return failed[0]
            if None not in codes:  # the ranks stop at the same step: all stopped, or none
                return STOPPED if STOPPED in codes else 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_all(procs)
        return 130
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def stop_all(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM every rank (each saves a checkpoint at its next step boundary), then SIGKILL what
    still runs after grace_s: a rank blocked in a collective with a dead peer never gets there."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


SLURM_FLAGS = ("nodes", "time", "partition", "account", "qos")
HINT = "sinfo -o '%P %D %c %G' lists each partition's nodes, CPUs and GPUs per node"


class SubmitError(Exception):
    """Slurm (or this host) refused the job; `status` is the exit status to return."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def submit_sbatch(path: Path, dependency: str | None) -> str:
    """`sbatch` of the standalone script; the job id."""
    cmd = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else [])]
    try:
        proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError(
            "sbatch not found: is this a Slurm login node? (--dry-run shows the script)", 2
        ) from None
    if proc.returncode != 0:
        raise SubmitError(f"sbatch rejected the job: {proc.stderr.strip()} ({HINT})")
    return proc.stdout.strip().split(";")[0]


def submitit_submitter(
    recipe: Recipe, recipe_path: Path, overrides: list[str], python: str, log_dir: Path
) -> Callable[[str | None], str]:
    """A function dependency -> job id submitting TrainTask through submitit's SlurmExecutor
    (not AutoExecutor, which runs the job here when there is no Slurm). submitit's files (script,
    pickles, one log per task) go to the run's slurm folder."""
    import submitit  # only here: --dry-run, --emit-sbatch and --via sbatch do not need it
    from submitit.core.utils import FailedJobError

    workdir = Path.cwd()
    try:
        params = submitit_parameters(recipe, recipe_path, workdir=workdir)
        command = python_command(recipe.slurm, python, workdir)
        executor = submitit.SlurmExecutor(folder=log_dir, python=shlex.join(command))
    except RecipeError as e:
        raise SubmitError(str(e), 2) from None
    except RuntimeError as e:  # no srun on this host
        raise SubmitError(f"{e} (--dry-run shows the sbatch script)", 2) from None
    executor.update_parameters(**params)
    task = TrainTask(str(recipe_path), tuple(overrides))

    def submit(dependency: str | None) -> str:
        executor.update_parameters(dependency=dependency)
        try:  # submitit prints sbatch's complaint before raising it: say it once, below
            with contextlib.redirect_stderr(io.StringIO()):
                return executor.submit(task).job_id
        except FailedJobError as e:
            raise SubmitError(f"Slurm rejected the job: {str(e).strip()} ({HINT})") from None

    return submit


def submit_to_slurm(args: argparse.Namespace) -> int:
    """Submit through submitit (default) or sbatch (--via sbatch), or print (--dry-run) or write
    (--emit-sbatch) the standalone sbatch script."""
    overrides = list(args.set)
    for key in SLURM_FLAGS:
        value = getattr(args, key)
        if value is not None:
            overrides.append(
                f"slurm.{key}={value!r}" if isinstance(value, str) else f"slurm.{key}={value}"
            )
    try:
        recipe = load_recipe(args.recipe, overrides)
        s = recipe.slurm
        check_job(s)
        world = s.nodes * tasks_per_node(s)
        validate(recipe, world_size=world)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path.cwd()
    log_dir = workdir / "runs" / recipe.name / "slurm"
    recipe_path = Path(args.recipe).resolve()
    python = s.python or ("python3" if s.container_image else sys.executable)
    script = render_sbatch(
        recipe, recipe_path, overrides, python=python, workdir=workdir, log_dir=log_dir
    )
    if args.dry_run:
        print(script, end="")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch fails a job whose log dir is missing
    if args.emit_sbatch:
        Path(args.emit_sbatch).write_text(script)
        print(f"wrote {args.emit_sbatch}: submit it with `sbatch {args.emit_sbatch}`")
        return 0
    # A chain: each job starts after the previous one ends, however it ended, and resumes from
    # the latest checkpoint; a finished run makes the rest exit at once.
    job_ids: list[str] = []
    try:
        if args.via == "sbatch":
            path = log_dir / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
            path.write_text(script)
            submit = functools.partial(submit_sbatch, path)
        else:
            submit = submitit_submitter(recipe, recipe_path, overrides, python, log_dir)
        for _ in range(args.chain):
            job_ids.append(submit(f"afterany:{job_ids[-1]}" if job_ids else args.dependency))
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    job_id = job_ids[0]
    if args.via == "sbatch":
        log, ranks = log_dir / f"{recipe.name}-{job_id}.out", ""
    else:  # submitit: one log per task
        path, log = log_dir / f"{job_id}_submission.sh", log_dir / f"{job_id}_0_log.out"
        ranks = f" (rank 0; rank r writes {job_id}_r_log.out)"
    chained = f", then {', '.join(job_ids[1:])} in a chain" if len(job_ids) > 1 else ""
    print(
        f"submitted job {job_id} ({world} ranks on {s.nodes} node(s)) through {args.via}"
        f"{chained}; script {path}"
    )
    print(f"log:      {log}{ranks}")
    print(f"follow:   squeue -j {','.join(job_ids)}; tail -f {log}")
    print(f"metrics:  make tensorboard LOGDIR={recipe.logging.dir}")
    print("status:   python launchers/status.py")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launchers/submit.py",
        description="Submit a recipe to Slurm (through submitit, or sbatch), print or write its "
        "standalone sbatch script, or run it here with --local.",
    )
    add_recipe_arguments(parser)
    parser.add_argument("--local", action="store_true", help="run here instead of on Slurm")
    parser.add_argument("--nproc", type=int, default=1, help="with --local: number of ranks")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    parser.add_argument("--emit-sbatch", metavar="FILE", help="write a standalone sbatch script")
    parser.add_argument("--nodes", type=int, help="override slurm.nodes")
    parser.add_argument("--time", help="override slurm.time, e.g. 2:00:00")
    parser.add_argument("--partition", help="override slurm.partition")
    parser.add_argument("--account", help="override slurm.account")
    parser.add_argument("--qos", help="override slurm.qos")
    parser.add_argument(
        "--via",
        choices=("submitit", "sbatch"),
        default="submitit",
        help="submit through submitit (default) or sbatch of the standalone script",
    )
    parser.add_argument("--dependency", help="sbatch dependency of the first job, e.g. afterok:123")
    parser.add_argument(
        "--chain",
        type=int,
        default=1,
        metavar="N",
        help="submit N jobs, each starting when the previous ends (long runs)",
    )
    args = parser.parse_args(argv)
    if args.chain < 1:
        parser.error("--chain must be >= 1")
    if not args.local:
        return submit_to_slurm(args)
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    if args.nproc == 1:
        from toolkit.train import STOPPED

        return run(args.recipe, args.set, stopped_status=STOPPED)
    try:  # a bad recipe or layout fails here, before any process starts
        recipe = load_recipe(args.recipe, args.set)
        validate(recipe, world_size=args.nproc)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_local_processes(args.recipe, args.set, args.nproc)


if __name__ == "__main__":
    sys.exit(main())
