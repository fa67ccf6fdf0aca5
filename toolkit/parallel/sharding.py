"""Which dim tensor parallelism cuts each parameter along, and where each TP rank's slice of a
packed weight lives: the one source of truth for the parallel code (tp.py) and the checkpoint
code (checkpoint/placement.py, checkpoint/megatron_layout.py).

A packed weight is a stack of components along the cut dim (Mamba-2 in_proj: z, x, B, C, dt).
Rank r of TP owns the r-th equal piece *of every component*, concatenated in the same order, never
a contiguous block of the packed matrix. A weight of one component is simply cut evenly.
"""

import torch
from torch import nn

Components = list[tuple[str, int]]

# Mamba2Mixer's parameters -> (the dim TP cuts, the components stacked along it). Components are
# sized in the global mixer (mamba_layout): z, x and d_inner are d_inner wide (expand x hidden),
# B and C groups x d_state, dt and heads one per head. in_proj's rows are the mixer's
# [z, x, B, C, dt] and conv1d's channels its [x, B, C] (DESIGN.md section 2).
MAMBA_LAYOUT: dict[str, tuple[int, tuple[str, ...]]] = {
    "in_proj.weight": (0, ("z", "x", "B", "C", "dt")),  # column-parallel, per component
    "conv1d.weight": (0, ("x", "B", "C")),  # depthwise: its channels, per component
    "conv1d.bias": (0, ("x", "B", "C")),
    "A_log": (0, ("heads",)),
    "D": (0, ("heads",)),
    "dt_bias": (0, ("heads",)),
    "norm.weight": (0, ("d_inner",)),  # whole groups of the gated norm: no communication
    "out_proj.weight": (1, ("d_inner",)),  # row-parallel: its input columns
}

# Every parameter TP cuts, by name suffix -> the dim; the rest (the blocks' pre-norms and the
# final norm) is replicated. tp.py cuts by these; tests check that the two agree.
TP_DIM: dict[str, int] = {
    **{f"mixer.{name}": dim for name, (dim, _) in MAMBA_LAYOUT.items()},
    "mixer.linear_qkv.weight": 0,  # rows grouped per KV group: an even cut is by whole groups
    "mixer.linear_proj.weight": 1,
    "mixer.linear_fc1.weight": 0,  # SwiGLU: gate and up, per component
    "mixer.linear_fc2.weight": 1,
    "embedding.weight": 0,  # vocab-parallel
    "output_layer.weight": 0,
}
VOCAB_PARAMS = ("embedding.weight", "output_layer.weight")


def split_dim(name: str) -> int | None:
    """The dim TP cuts parameter `name` along (a full name such as `layers.0.mixer.D`), or None
    if it is replicated."""
    for suffix, dim in TP_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def mamba_layout(d_inner: int, heads: int, gn: int) -> dict[str, tuple[int, Components]]:
    """MAMBA_LAYOUT with the component sizes of a global mixer of d_inner channels, `heads`
    heads and gn = groups x d_state, for code that sees only sizes or tensors (checkpoints)."""
    size = {"z": d_inner, "x": d_inner, "d_inner": d_inner, "B": gn, "C": gn}
    size |= {"dt": heads, "heads": heads}
    return {
        name: (dim, [(part, size[part]) for part in parts])
        for name, (dim, parts) in MAMBA_LAYOUT.items()
    }


def mamba_components(mixer: nn.Module) -> dict[str, tuple[int, Components]]:
    """The layout of a (global) Mamba2Mixer's parameters, by name within the mixer."""
    return mamba_layout(mixer.d_inner, mixer.num_heads, mixer.num_groups * mixer.d_state)


def packed_mamba_parameter(name: str) -> str | None:
    """The MAMBA_LAYOUT name of `name` (a full parameter name) if it is a Mamba weight of several
    components (stored and cut per component), else None."""
    for param, (_, parts) in MAMBA_LAYOUT.items():
        if len(parts) > 1 and name.endswith("mixer." + param):
            return param
    return None


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
