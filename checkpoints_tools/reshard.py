#!/usr/bin/env python3
"""Rewrite a checkpoint for another parallel layout: the same as `hybrid-reshard`, whose code is
toolkit/cli/reshard.py."""

import sys

from toolkit.cli.reshard import main

if __name__ == "__main__":
    sys.exit(main())
