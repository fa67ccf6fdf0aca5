"""`python -m toolkit.config`: see toolkit/config/cli.py."""

from toolkit.config.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
