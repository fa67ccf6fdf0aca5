"""hybrid-toolkit: train, checkpoint, reshard and serve hybrid Mamba-2 / attention / MLP models."""

__version__ = "0.1.0"
