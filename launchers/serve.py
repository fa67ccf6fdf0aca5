#!/usr/bin/env python3
"""Serve a checkpoint over HTTP: the same as `hybrid-serve`, whose code is
toolkit/cli/serve.py."""

import sys

from toolkit.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
