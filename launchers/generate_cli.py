#!/usr/bin/env python3
"""Ask a running server for text: the same as `hybrid-client`, whose code is
toolkit/cli/client.py."""

import sys

from toolkit.cli.client import main

if __name__ == "__main__":
    sys.exit(main())
