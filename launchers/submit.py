#!/usr/bin/env python3
"""Run a recipe as a Slurm job (sbatch), or on this machine (--local).

    python launchers/submit.py recipes/8b_hybrid.toml [--nodes 4 --time 2:00:00] [--dry-run]
    python launchers/submit.py recipes/8b_hybrid.toml --emit-sbatch job.sbatch

    python launchers/submit.py recipes/tiny_hybrid.toml --local [--set train.steps=50]
    python launchers/submit.py recipes/tiny_hybrid.toml --local --nproc 2 --set parallel.tp=2

With --nproc N, N processes (gloo on CPUs, NCCL on GPUs) run the recipe's TP x PP x DP layout.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from toolkit.config import RecipeError, load_recipe, validate  # noqa: E402
from toolkit.distributed import free_port  # noqa: E402
from toolkit.slurm import render_sbatch, tasks_per_node  # noqa: E402
from toolkit.train import add_recipe_arguments, run  # noqa: E402


def run_local_processes(recipe: str, overrides: list[str], nproc: int) -> int:
    """Start nproc ranks of `python -m toolkit.train` here; if one fails, stop the others."""
    port = str(free_port())
    sets = [a for o in overrides for a in ("--set", o)]
    procs = []
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
        cmd = [sys.executable, "-m", "toolkit.train", recipe, *sets]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                stop_all(procs)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_all(procs)
        return 130


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


def submit_to_slurm(args: argparse.Namespace) -> int:
    """Render the sbatch script; print it (--dry-run), write it (--emit-sbatch) or submit it."""
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
        world = s.nodes * tasks_per_node(s)
        validate(recipe, world_size=world)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path.cwd()
    log_dir = workdir / "runs" / recipe.name / "slurm"
    python = s.python or ("python3" if s.container_image else sys.executable)
    script = render_sbatch(
        recipe,
        Path(args.recipe).resolve(),
        overrides,
        python=python,
        workdir=workdir,
        log_dir=log_dir,
    )
    if args.dry_run:
        print(script, end="")
        return 0
    if args.emit_sbatch:
        log_dir.mkdir(parents=True, exist_ok=True)  # sbatch fails a job whose log dir is missing
        Path(args.emit_sbatch).write_text(script)
        print(f"wrote {args.emit_sbatch}: submit it with `sbatch {args.emit_sbatch}`")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    # A chain: each job starts after the previous one ends, however it ended, and resumes from
    # the latest checkpoint; a finished run makes the rest exit at once.
    job_ids: list[str] = []
    for _ in range(args.chain):
        dependency = [f"--dependency=afterany:{job_ids[-1]}"] if job_ids else []
        if not job_ids and args.dependency:
            dependency = [f"--dependency={args.dependency}"]
        try:
            proc = subprocess.run(
                ["sbatch", "--parsable", *dependency, str(path)], capture_output=True, text=True
            )
        except FileNotFoundError:
            print(
                "error: sbatch not found: is this a Slurm login node? (--dry-run shows the script)",
                file=sys.stderr,
            )
            return 2
        if proc.returncode != 0:
            print(f"error: sbatch rejected the job: {proc.stderr.strip()}", file=sys.stderr)
            return proc.returncode
        job_ids.append(proc.stdout.strip().split(";")[0])
    job_id = job_ids[0]
    chained = f", then {', '.join(job_ids[1:])} in a chain" if len(job_ids) > 1 else ""
    print(f"submitted job {job_id} ({world} ranks on {s.nodes} node(s)){chained}; script {path}")
    print(f"log:      {log_dir}/{recipe.name}-{job_id}.out")
    print(f"follow:   squeue -j {','.join(job_ids)}; tail -f {log_dir}/{recipe.name}-{job_id}.out")
    print(f"metrics:  make tensorboard LOGDIR={recipe.logging.dir}")
    print("status:   python launchers/status.py")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launchers/submit.py",
        description="Submit a recipe to Slurm (sbatch), print or write its sbatch script, or run "
        "it here with --local.",
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
        return run(args.recipe, args.set)
    try:  # a bad recipe or layout fails here, before any process starts
        recipe = load_recipe(args.recipe, args.set)
        validate(recipe, world_size=args.nproc)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_local_processes(args.recipe, args.set, args.nproc)


if __name__ == "__main__":
    sys.exit(main())
