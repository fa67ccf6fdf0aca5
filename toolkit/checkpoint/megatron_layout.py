"""Names and tensor-parallel layout of the reference framework's checkpoints, as pure functions
of parameter names and shapes (no model needed): what megatron.py writes and reads with.

Our names are HybridLM's (`layers.3.mixer.in_proj.weight`); the reference's are its state-dict
keys (`decoder.layers.1.mixer.in_proj.weight` on a later pipeline stage). A TP rank owns its
piece of every component of a packed tensor (toolkit.parallel.sharding).
"""

import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from toolkit.parallel.sharding import (
    VOCAB_PARAMS,
    Components,
    mamba_layout,
    packed_mamba_parameter,
    shard_indices,
    split_dim,
)

MIXER_KEY = {"M": "mixer", "*": "self_attention", "-": "mlp"}
# A layer's pre-norm: 2024-era `norm`, Megatron's local specs, and the fused (Transformer Engine)
# norms inside the first linear of each block kind.
NORM_KEY = re.compile(
    r"(?:(?:norm|input_layernorm|pre_mlp_layernorm)\."
    r"|(?:mixer\.in_proj|self_attention\.linear_qkv|mlp\.linear_fc1)\.layer_norm_)(weight|bias)"
)
# The generations of Megatron-core's hybrid layer specs an export can target (DESIGN.md section
# 3): "2024" (megatron/core/models/mamba/mamba_layer_specs.py, the released checkpoints) keeps
# the Mamba layer's pre-norm as its own `norm`; "current" (models/hybrid/hybrid_layer_specs.py)
# fuses it into in_proj and names the conv parameters `conv1d_weight|bias`. Attention and MLP
# pre-norms are fused into their first linear in both.
GENERATIONS = ("2024", "current")
FUSED_NORM = {"*": "self_attention.linear_qkv.layer_norm_", "-": "mlp.linear_fc1.layer_norm_"}
CURRENT_MAMBA_NAMES = {
    "norm.": "mixer.in_proj.layer_norm_",
    "mixer.conv1d.weight": "mixer.conv1d_weight",
    "mixer.conv1d.bias": "mixer.conv1d_bias",
}
# The one parameter that tells each block kind apart, in our names.
KIND_MARKER = {"M": "in_proj.weight", "*": "linear_qkv.weight", "-": "linear_fc1.weight"}


def megatron_key(name: str, pattern: str, offset: int, generation: str = "2024") -> str:
    """Our parameter name -> the reference's key, in a model of layer `pattern` (the block kind
    names the mixer and its pre-norm) for Megatron-core `generation` (GENERATIONS); `offset` is
    the first layer of the parameter's pipeline stage."""
    if generation not in GENERATIONS:
        raise ValueError(f"unknown Megatron generation {generation!r} (one of {GENERATIONS})")
    if name == "embedding.weight":
        return "embedding.word_embeddings.weight"
    if name == "output_layer.weight":
        return name
    if name.startswith("final_norm."):
        return "decoder." + name
    match = re.fullmatch(r"layers\.(\d+)\.(norm|mixer)\.(.+)", name)
    if not match:
        raise ValueError(f"no Megatron key for parameter {name!r}")
    layer, part, param = int(match[1]), match[2], match[3]
    kind, prefix = pattern[layer], f"decoder.layers.{layer - offset}"
    if part == "norm" and kind in FUSED_NORM:
        return f"{prefix}.{FUSED_NORM[kind]}{param}"
    rest = f"{part}.{param}" if part == "norm" else f"{MIXER_KEY[kind]}.{param}"
    if kind == "M" and generation == "current":
        for ours, theirs in CURRENT_MAMBA_NAMES.items():
            if rest.startswith(ours):
                return f"{prefix}.{theirs}{rest.removeprefix(ours)}"
    return f"{prefix}.{rest}"


def our_name(key: str, offset: int) -> str:
    """The reference's key (any era) -> our parameter name, layer numbers made global."""
    if key == "embedding.word_embeddings.weight":
        return "embedding.weight"
    if key == "output_layer.weight":
        return key
    if key.startswith("decoder.final_norm."):
        return key.removeprefix("decoder.")
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
    if not match:
        raise KeyError(f"{key!r} is not a key of a hybrid model")
    layer, rest = int(match[1]) + offset, match[2]
    norm = NORM_KEY.fullmatch(rest)
    if norm:
        return f"layers.{layer}.norm.{norm[1]}"
    mixer, _, param = rest.partition(".")
    param = re.sub(r"^conv1d_(weight|bias)$", r"conv1d.\1", param)  # current Megatron's names
    if mixer not in MIXER_KEY.values() or not param:
        raise KeyError(
            f"{key!r}: unknown block part {mixer!r} (expected mixer, self_attention, mlp)"
        )
    return f"layers.{layer}.mixer.{param}"


def pattern_of(state: Iterable[str]) -> str:
    """The layer pattern of a state dict in our names, read from which mixer each layer holds."""
    kinds: dict[int, str] = {}
    for name in state:
        match = re.fullmatch(r"layers\.(\d+)\.mixer\.(.+)", name)
        for kind, marker in KIND_MARKER.items():
            if match and match[2] == marker:
                kinds[int(match[1])] = kind
    missing = sorted(set(range(max(kinds, default=-1) + 1)) - set(kinds))
    if missing:
        raise KeyError(f"layers {missing} have no in_proj, linear_qkv or linear_fc1 weight")
    return "".join(kinds[i] for i in range(len(kinds)))


# ---- tensor-parallel layout (pure) ----


def tp_dim(name: str) -> int | None:
    """The dimension tensor parallelism cuts our parameter `name` along (sharding's TP_DIM);
    None: replicated (the norms). A parameter of no known kind is a KeyError."""
    if re.fullmatch(r"layers\.\d+\.norm\.\w+|final_norm\.\w+", name):
        return None
    known = name in VOCAB_PARAMS or re.fullmatch(r"layers\.\d+\.mixer\..+", name)
    dim = split_dim(name) if known else None
    if dim is None:
        raise KeyError(f"no tensor-parallel rule for parameter {name!r}")
    return dim


def tp_components(name: str, shapes: Mapping[str, Sequence[int]]) -> Components:
    """The components stacked along tp_dim(name) of a global parameter; TP rank r owns the r-th
    piece of each. `shapes` holds the global shapes of the model's parameters: Mamba's packed
    in_proj and conv1d are measured from out_proj (d_inner) and A_log (heads), and a SwiGLU fc1
    is recognised by having twice as many rows as fc2 has columns."""
    prefix, _, param = name.rpartition(".mixer.")

    def size(other: str, dim: int) -> int:
        if f"{prefix}.mixer.{other}" not in shapes:
            raise KeyError(f"{name}: its layout needs {prefix}.mixer.{other}, which is missing")
        return shapes[f"{prefix}.mixer.{other}"][dim]

    mamba = packed_mamba_parameter(name)
    if mamba is not None:
        d_inner, heads = size("out_proj.weight", 1), size("A_log", 0)
        gn = (size("in_proj.weight", 0) - 2 * d_inner - heads) // 2
        return mamba_layout(d_inner, heads, gn)[mamba][1]
    rows = shapes[name][tp_dim(name)]
    if param == "linear_fc1.weight" and rows == 2 * size("linear_fc2.weight", 1):
        return [("gate", rows // 2), ("up", rows // 2)]
    return [(name, rows)]


def rank_piece(
    full: torch.Tensor, name: str, shapes: Mapping[str, Sequence[int]], tp: int, rank: int
) -> torch.Tensor:
    """TP rank `rank`'s piece of the global tensor `full` (parameter `name`)."""
    dim = tp_dim(name)
    if dim is None or tp == 1:
        return full
    return full.index_select(dim, shard_indices(tp_components(name, shapes), tp, rank))


def merge_pieces(
    pieces: Sequence[torch.Tensor], name: str, shapes: Mapping[str, Sequence[int]]
) -> torch.Tensor:
    """The global tensor from every TP rank's piece, in rank order (rank_piece's inverse)."""
    dim, tp = tp_dim(name), len(pieces)
    if dim is None or tp == 1:
        return pieces[0].clone()  # not a view of a memory-mapped file that could change
    full = pieces[0].new_empty(tuple(shapes[name]))
    components = tp_components(name, shapes)
    for rank, piece in enumerate(pieces):
        full.index_copy_(dim, shard_indices(components, tp, rank), piece.to(full.dtype))
    return full
