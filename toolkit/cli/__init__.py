"""The commands: each module's `main` is a console script of pyproject.toml (`hybrid-submit`,
`hybrid-reshard`, ...) and is what the thin files in launchers/ and checkpoints_tools/ call.
Light on purpose: importing the package loads no torch, so --help and bad input answer at once."""
