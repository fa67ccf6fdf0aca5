#!/usr/bin/env python3
"""List this toolkit's Slurm jobs (state, last step, loss): the same as `hybrid-status`, whose
code is toolkit/cli/status.py."""

import sys

from toolkit.cli.status import main

if __name__ == "__main__":
    sys.exit(main())
