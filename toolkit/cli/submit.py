"""Run a recipe as a Slurm job (through submitit, or sbatch), or on this machine (--local).

    python launchers/submit.py recipes/8b_hybrid.toml [--nodes 4 --time 2:00:00] [--dry-run]
    python launchers/submit.py recipes/8b_hybrid.toml --via sbatch
    python launchers/submit.py recipes/8b_hybrid.toml --data data/corpus_text_document \
        --tokenizer tok.model        # real data: the reference's train.sh <data-path> <tokenizer>
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

# Light imports only: torch loads when training starts, so --help, --dry-run and bad input answer
# at once.
from toolkit.config import (
    Recipe,
    RecipeError,
    add_recipe_arguments,
    job_environment,
    load_recipe,
)
from toolkit.data.flags import data_overrides
from toolkit.slurm import (
    TRAIN_HERE,
    log_dir,
    no_slurm_here,
    python_command,
    render_sbatch,
    submitit_parameters,
)
from toolkit.train_task import TrainTask


def train_command(recipe: str, overrides: list[str]) -> list[str]:
    """The command each local rank runs."""
    sets = [a for o in overrides for a in ("--set", o)]
    return [sys.executable, "-m", "toolkit.train", recipe, *sets]


def run_local_processes(
    recipe: str, overrides: list[str], nproc: int, environment: dict[str, str] | None = None
) -> int:
    """Start nproc ranks of `python -m toolkit.train` here, with `environment` (slurm.env) in
    theirs; if one fails, stop the others.
    SIGTERM and SIGUSR2 are passed on to the ranks, which save a checkpoint at their next step
    boundary and stop: exit status STOPPED when they stopped before the last step."""
    from toolkit.distributed import free_port  # torch: only when ranks start
    from toolkit.train import STOPPED

    port = str(free_port())
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
            **(environment or {}),
        }
        cmd = [*train_command(recipe, overrides), f"--stopped-status={STOPPED}"]
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


SLURM_FLAGS = ("nodes", "time", "partition", "account", "qos")  # overrides of slurm.*
SLURM_ONLY = (*SLURM_FLAGS, "emit_sbatch", "via", "dependency")  # refused with --local
HINT = "sinfo -o '%P %D %c %G' lists each partition's nodes, CPUs and GPUs per node"


class SubmitError(Exception):
    """Slurm (or this host) refused the job; `status` is the exit status to return."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def submit_sbatch(path: Path, dependency: str | None, advice: str = TRAIN_HERE) -> str:
    """`sbatch` of the standalone script; the job id. `advice`: what to do without Slurm."""
    cmd = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else [])]
    try:
        proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError(no_slurm_here("sbatch", advice=advice) or "no sbatch", 2) from None
    if proc.returncode != 0:
        no_slurm = no_slurm_here("sbatch", proc.stderr, advice)
        if no_slurm:
            raise SubmitError(no_slurm, 2)
        raise SubmitError(f"sbatch rejected the job: {proc.stderr.strip()} ({HINT})")
    return proc.stdout.strip().split(";")[0]


def submitit_submitter(
    recipe: Recipe, recipe_path: Path, overrides: list[str], python: str, folder: Path
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
        executor = submitit.SlurmExecutor(folder=folder, python=shlex.join(command))
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
            no_slurm = no_slurm_here("sbatch", str(e))
            if no_slurm:
                raise SubmitError(no_slurm, 2) from None
            raise SubmitError(f"Slurm rejected the job: {str(e).strip()} ({HINT})") from None

    return submit


def memory_problem(recipe: Recipe, world: int) -> str | None:
    """Why the job's layout cannot fit slurm.gpu_memory_gb (the per-rank plan of toolkit/memory.py
    against it), or None; nothing to check without a GPU size."""
    if not recipe.slurm.gpu_memory_gb or not recipe.slurm.gpus_per_node:
        return None
    from toolkit.memory import check_fits, plan_memory  # torch: only with a GPU size to check

    return check_fits(plan_memory(recipe, world), recipe.slurm.gpu_memory_gb)


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
    try:  # once: the sections, and the layout on the job's slurm.nodes x tasks per node
        recipe = load_recipe(args.recipe, overrides, world_size="slurm")
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s, world = recipe.slurm, recipe.slurm.world_size
    too_big = memory_problem(recipe, world)
    if too_big:
        print(f"error: {args.recipe}: slurm.gpu_memory_gb: {too_big}", file=sys.stderr)
        return 2
    workdir = Path.cwd()
    logs = log_dir(recipe, workdir)
    recipe_path = Path(args.recipe).resolve()
    python = s.python or ("python3" if s.container_image else sys.executable)
    script = render_sbatch(
        recipe, recipe_path, overrides, python=python, workdir=workdir, log_dir=logs
    )
    if args.dry_run:
        print(script, end="")
        return 0
    problem = prepare_outputs(args, logs)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.emit_sbatch:
        Path(args.emit_sbatch).write_text(script)
        print(f"wrote {args.emit_sbatch}: submit it with `sbatch {args.emit_sbatch}`")
        return 0
    # A chain: each job starts after the previous one ends, however it ended, and resumes from
    # the latest checkpoint; a finished run makes the rest exit at once.
    job_ids: list[str] = []
    try:
        if args.via == "sbatch":
            path = logs / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
            path.write_text(script)
            submit = functools.partial(submit_sbatch, path)
        else:
            submit = submitit_submitter(recipe, recipe_path, overrides, python, logs)
        for _ in range(args.chain):
            job_ids.append(submit(f"afterany:{job_ids[-1]}" if job_ids else args.dependency))
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    job_id = job_ids[0]
    if args.via == "sbatch":
        log, ranks = logs / f"{recipe.name}-{job_id}.out", ""
    else:  # submitit: one log per task
        path, log = logs / f"{job_id}_submission.sh", logs / f"{job_id}_0_log.out"
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


def prepare_outputs(args: argparse.Namespace, logs: Path) -> str | None:
    """Create the Slurm log directory, once nothing stands in the way (else why not, and nothing
    is created): a place to write --emit-sbatch, or Slurm on this machine to submit to."""
    if args.emit_sbatch:
        target = Path(args.emit_sbatch)
        if target.is_dir() or not target.parent.is_dir():
            return f"--emit-sbatch {target}: not a file in an existing directory"
    elif no_slurm_here("sbatch"):
        return no_slurm_here("sbatch")
    try:
        logs.mkdir(parents=True, exist_ok=True)  # sbatch fails a job whose log dir is missing
    except OSError as e:
        return (
            f"{args.recipe}: logging.dir: cannot create the Slurm log directory {logs} beside "
            f"it: {e.strerror or e}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launchers/submit.py",
        description="Submit a recipe to Slurm (through submitit, or sbatch), print or write its "
        "standalone sbatch script, or run it here with --local.",
    )
    add_recipe_arguments(parser)
    parser.add_argument("--local", action="store_true", help="run here instead of on Slurm")
    parser.add_argument("--nproc", type=int, default=1, help="with --local: number of ranks")
    parser.add_argument(
        "--data", help="data.blend: PREFIX or W1,PREFIX1,W2,PREFIX2 (indexed .bin/.idx datasets)"
    )
    parser.add_argument("--tokenizer", help="data.tokenizer: a tokenizer.json or .model file")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="start nothing: print the sbatch script (with --local: the command) and exit",
    )
    parser.add_argument("--emit-sbatch", metavar="FILE", help="write a standalone sbatch script")
    parser.add_argument("--nodes", type=int, help="override slurm.nodes")
    parser.add_argument("--time", help="override slurm.time, e.g. 2:00:00")
    parser.add_argument("--partition", help="override slurm.partition")
    parser.add_argument("--account", help="override slurm.account")
    parser.add_argument("--qos", help="override slurm.qos")
    parser.add_argument(
        "--via",
        choices=("submitit", "sbatch"),
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
    try:  # shorthands for recipe keys: they travel to the ranks and jobs as --set overrides
        args.set = [*data_overrides(args.data, args.tokenizer), *args.set]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.chain < 1:
        parser.error("--chain must be >= 1")
    if args.local:
        slurm_only = [
            f"--{k.replace('_', '-')}" for k in SLURM_ONLY if getattr(args, k) is not None
        ]
        if args.chain != 1:
            slurm_only.append("--chain")
        if slurm_only:
            parser.error(f"{', '.join(slurm_only)}: for Slurm jobs, not with --local")
        if args.nproc < 1:
            parser.error("--nproc must be >= 1")
        return run_here(args)
    if args.nproc != 1:
        parser.error("--nproc: with --local; a Slurm job's ranks are slurm.nodes x tasks per node")
    args.via = args.via or "submitit"
    return submit_to_slurm(args)


def run_here(args: argparse.Namespace) -> int:
    """--local: check the recipe against --nproc ranks, then train here (--dry-run: only say
    what would run)."""
    try:  # a bad recipe or layout fails here, before any process starts
        recipe = load_recipe(args.recipe, args.set, world_size=args.nproc)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    environment = job_environment(recipe.slurm)
    if args.dry_run:
        ranks = f"{args.nproc} ranks" if args.nproc > 1 else "1 process"
        command = [
            *(f"{k}={v}" for k, v in environment.items()),
            *train_command(args.recipe, args.set),
        ]
        print(f"would run here ({ranks}): {shlex.join(command)}")
        return 0
    if args.nproc == 1:
        os.environ.update(environment)  # before torch reads any of it (the CUDA allocator's...)
        from toolkit.train import STOPPED, run  # torch: only when training starts

        return run(args.recipe, args.set, stopped_status=STOPPED)
    return run_local_processes(args.recipe, args.set, args.nproc, environment)


if __name__ == "__main__":
    sys.exit(main())
