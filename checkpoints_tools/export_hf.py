#!/usr/bin/env python3
"""Export a checkpoint to Hugging Face (NemotronH): the same as `hybrid-export-hf`, whose code is
toolkit/cli/export_hf.py."""

import sys

from toolkit.cli.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
