#!/usr/bin/env python3
"""Serve a checkpoint from a Slurm job: the same as `hybrid-serve-slurm`, whose code is
toolkit/cli/serve_slurm.py."""

import sys

from toolkit.cli.serve_slurm import main

if __name__ == "__main__":
    sys.exit(main())
