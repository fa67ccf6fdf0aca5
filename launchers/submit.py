#!/usr/bin/env python3
"""Run a recipe as a Slurm job, or here with --local: the same as `hybrid-submit`, whose code is
toolkit/cli/submit.py."""

import sys

from toolkit.cli.submit import main

if __name__ == "__main__":
    sys.exit(main())
