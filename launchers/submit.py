#!/usr/bin/env python3
"""Run a recipe: on this machine (--local) or, once the Slurm launcher lands, as a Slurm job.

python launchers/submit.py recipes/tiny_hybrid.toml --local [--set train.steps=50]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from toolkit.train import add_recipe_arguments, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launchers/submit.py",
        description="Train a recipe locally (--local). Slurm submission is not available yet.",
    )
    add_recipe_arguments(parser)
    parser.add_argument("--local", action="store_true", help="run here, in this process")
    args = parser.parse_args(argv)
    if not args.local:
        parser.error("Slurm submission is not implemented in this version; use --local to run here")
    return run(args.recipe, args.set)


if __name__ == "__main__":
    sys.exit(main())
