"""Where a parameter's local tensor lives in the checkpoint's global, layout-independent arrays.

A checkpoint holds one array per logical tensor in its global shape. Packed weights are split into
their components (`layers.0.mixer.in_proj.weight.z`, `.x`, `.B`, `.C`, `.dt`; conv1d `.x|.B|.C`;
SwiGLU fc1 `.gate|.up`), so that any tensor-parallel degree reads each component as one
contiguous slice. The vocabulary arrays keep only the real vocabulary's rows: padding depends on
TP, and padded rows are inert (the loss and generation mask them). Which dim TP cuts and the
components of each packed weight come from toolkit/parallel/sharding.py, as for the TP code.

The same function serves the writer (local rows -> where they go) and the reader (where its rows
come from), so a checkpoint written at one TP degree reads at any other.
"""

import math
from dataclasses import dataclass

from toolkit.config import ModelConfig, padded_vocab_size
from toolkit.parallel.sharding import VOCAB_PARAMS, mamba_layout, packed_mamba_parameter, split_dim

# A shard is split into this many chunks (the first that divides it and leaves chunks of at least
# MIN_CHUNK_BYTES), so that readers at up to 8x the writer's TP read whole chunks only.
FINE_SPLITS = (8, 4, 2)
MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class Piece:
    """Rows `local` (along `dim`) of a local tensor are rows `region` of array `array`."""

    array: str
    shape: tuple[int, ...]  # the array's global shape
    dim: int | None  # the dim TP cuts (None: the tensor is replicated and stored whole)
    local: slice
    region: slice
    chunks: tuple[int, ...]

    def local_index(self) -> tuple[slice, ...]:
        return _index(self.dim, self.local, len(self.shape))

    def global_index(self) -> tuple[slice, ...]:
        return _index(self.dim, self.region, len(self.shape))


def _index(dim: int | None, rows: slice, ndim: int) -> tuple[slice, ...]:
    if dim is None:
        return (slice(None),) * ndim
    return (slice(None),) * dim + (rows,)


def components(name: str, cfg: ModelConfig) -> list[tuple[str, int]] | None:
    """The packed components of a parameter along dim 0, in order, or None if not packed."""
    mamba = packed_mamba_parameter(name)
    if mamba is not None:
        d_inner = cfg.mamba_expand * cfg.hidden_size
        heads, gn = d_inner // cfg.mamba_head_dim, cfg.mamba_num_groups * cfg.mamba_state_dim
        return mamba_layout(d_inner, heads, gn)[mamba][1]
    if name.endswith("mixer.linear_fc1.weight") and cfg.mlp_activation == "swiglu":
        return [("gate", cfg.ffn_size), ("up", cfg.ffn_size)]
    return None


def pieces(
    name: str,
    local_shape: tuple[int, ...],
    cfg: ModelConfig,
    vocab_size: int,
    tp: int,
    tp_rank: int,
    itemsize: int,
) -> list[Piece]:
    """How the local tensor (this TP rank's shard, or the whole tensor at TP=1) of parameter
    `name` maps onto the global arrays."""
    shape = tuple(local_shape)
    dim = split_dim(name)
    if dim is None or not shape:
        return [
            Piece(
                name, shape, None, slice(None), slice(None), chunk_shape(shape, None, 0, itemsize)
            )
        ]
    parts = components(name, cfg) or [(None, shape[dim] * tp)]
    if name in VOCAB_PARAMS:  # rows past the real vocabulary are padding: not stored
        shard = shape[0]
        start = tp_rank * shard
        stop = max(start, min(start + shard, vocab_size))
        global_shape = (vocab_size, *shape[1:])
        # Readers pad differently (a multiple of divisible_by x their TP): chunk at a row count
        # that divides the shards of readers at TP 1, 2, 4 and 8 as well as this writer's.
        rows = math.gcd(
            shard, padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, 8) // 8
        )
        chunks = chunk_shape(global_shape, 0, rows, itemsize, split=False)
        return [Piece(name, global_shape, 0, slice(0, stop - start), slice(start, stop), chunks)]
    out, offset = [], 0
    for part, size in parts:
        if size % tp:
            raise ValueError(f"{name}: component {part} of size {size} does not split into TP={tp}")
        shard = size // tp
        global_shape = shape[:dim] + (size,) + shape[dim + 1 :]
        out.append(
            Piece(
                name if part is None else f"{name}.{part}",
                global_shape,
                dim,
                slice(offset, offset + shard),
                slice(tp_rank * shard, (tp_rank + 1) * shard),
                chunk_shape(global_shape, dim, shard, itemsize),
            )
        )
        offset += shard
    if offset != shape[dim]:
        raise ValueError(
            f"{name}: local size {shape[dim]} along dim {dim} is not the sum of its components' "
            f"shards ({offset}) at TP={tp}"
        )
    return out


def chunk_shape(
    shape: tuple[int, ...], dim: int | None, shard: int, itemsize: int, split: bool = True
) -> tuple[int, ...]:
    """Chunks that never straddle two writers' shards along `dim`, split finer (FINE_SPLITS)
    so readers at other TP degrees read little they do not need, and cut
    along the other dims when large. Along dims no writer shares, edge chunks may be partial."""
    if not shape:
        return ()
    chunks = list(shape)
    if dim is not None:
        chunks[dim] = shard
        for parts in FINE_SPLITS if split else ():
            rows = shard // parts
            if shard % parts == 0 and _nbytes(shape, dim, rows, itemsize) >= MIN_CHUNK_BYTES:
                chunks[dim] = rows
                break
    other = next((d for d in range(len(shape)) if d != dim), None)
    if other is None:  # 1-d along the cut: halve the chunk while it is too large and divisible
        while chunks[0] * itemsize > MAX_CHUNK_BYTES and chunks[0] % 2 == 0:
            chunks[0] //= 2
        return tuple(chunks)
    per_row = itemsize
    for d, size in enumerate(chunks):
        if d != other:
            per_row *= size
    chunks[other] = max(1, min(shape[other], MAX_CHUNK_BYTES // max(per_row, 1)))
    return tuple(chunks)


def _nbytes(shape: tuple[int, ...], dim: int, rows: int, itemsize: int) -> int:
    n = itemsize * rows
    for d, size in enumerate(shape):
        if d != dim:
            n *= size
    return n
