#!/usr/bin/env python3
"""Import a Megatron checkpoint: the same as `hybrid-import-megatron`, whose code is
toolkit/cli/import_megatron.py."""

import sys

from toolkit.cli.import_megatron import main

if __name__ == "__main__":
    sys.exit(main())
