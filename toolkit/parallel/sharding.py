"""Where each tensor-parallel rank's slice of a packed weight lives: the one source of truth for
the parallel code and the checkpoint code.

A packed weight is a stack of components along dim 0 (Mamba-2 in_proj: z, x, B, C, dt). Rank r of
TP owns the r-th equal piece *of every component*, concatenated in the same order, never a
contiguous block of the packed matrix.
"""

import torch
from torch import nn

Components = list[tuple[str, int]]


def mamba_components(mixer: nn.Module) -> dict[str, Components]:
    """Component layout of a (global) Mamba2Mixer's packed in_proj rows and conv1d channels."""
    return packed_mamba_components(mixer.d_inner, mixer.num_heads, mixer.num_groups * mixer.d_state)


def packed_mamba_components(d_inner: int, heads: int, gn: int) -> dict[str, Components]:
    """The same layout from sizes alone (d_inner, heads, groups x d_state), for code that sees
    only tensors, such as checkpoint converters."""
    return {
        "in_proj": [("z", d_inner), ("x", d_inner), ("B", gn), ("C", gn), ("dt", heads)],
        "conv1d": [("x", d_inner), ("B", gn), ("C", gn)],
    }


def shard_indices(components: Components, tp: int, rank: int) -> torch.Tensor:
    """Row indices (into the packed dim) of rank's piece of every component, in order."""
    pieces, offset = [], 0
    for name, size in components:
        if size % tp:
            raise ValueError(f"component {name} of size {size} does not split into TP={tp}")
        part = size // tp
        pieces.append(torch.arange(offset + rank * part, offset + (rank + 1) * part))
        offset += size
    return torch.cat(pieces)


def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Cut this rank's piece of `full` (a global tensor) the way `param` was cut by TP; a
    parameter that was not cut (`_tp_dim` unset) takes `full` whole."""
    dim = getattr(param, "_tp_dim", None)
    return full if dim is None else full.index_select(dim, param._tp_index.to(full.device))
