#!/usr/bin/env python3
"""Run a recipe: on this machine (--local) or, once the Slurm launcher lands, as a Slurm job.

    python launchers/submit.py recipes/tiny_hybrid.toml --local [--set train.steps=50]
    python launchers/submit.py recipes/tiny_hybrid.toml --local --nproc 2 --set parallel.tp=2

With --nproc N, N processes (gloo on CPUs, NCCL on GPUs) run the recipe's TP x PP x DP layout.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from toolkit.config import RecipeError, load_recipe, validate  # noqa: E402
from toolkit.train import add_recipe_arguments, run  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launchers/submit.py",
        description="Train a recipe locally (--local). Slurm submission is not available yet.",
    )
    add_recipe_arguments(parser)
    parser.add_argument("--local", action="store_true", help="run here instead of on Slurm")
    parser.add_argument("--nproc", type=int, default=1, help="with --local: number of ranks")
    args = parser.parse_args(argv)
    if not args.local:
        parser.error("Slurm submission is not implemented in this version; use --local to run here")
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
