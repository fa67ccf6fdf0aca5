#!/usr/bin/env python3
"""Show (--verify: check) what a checkpoint holds: the same as `hybrid-inspect`, whose code is
toolkit/cli/inspect_checkpoint.py."""

import sys

from toolkit.cli.inspect_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
