"""SiLU(depthwise causal conv) of the Mamba-2 mixer's xBC for training, forward and backward, as
two Triton kernels: the conv of our fused op (fused_mamba.py), which needs no causal-conv1d
(model.mamba_conv_backend; 'auto' takes it where causal-conv1d does not import).

xBC is read as it lies in in_proj's output, channels adjacent ([b, l, c], l's stride the whole
row). Each program takes a tile of rows and channels; the k shifted loads of a tile are mostly
L1/L2 hits. Arithmetic in fp32 as causal-conv1d's: out = silu(bias + sum_j w[c, j]
x[t - (k - 1) + j]), zeros before the first row. The backward computes g = dout silu'(a) once a
tile into a ring of two tiles that the next pass reads shifted for dx; the weight's and bias's
gradients are kept per row in registers and summed per program once, then over programs by
torch: the same sums as causal-conv1d's in another order, deterministic.

Measured on an H100 at the 800M's widths (RESULTS.md 2026-12-06, late morning): the forward
bit for bit causal-conv1d's and as fast, the backward 1.4x slower (0.93 against 0.65 ms).

The _stream kernels (STREAM) walk a program's rows one at a time over a wide block of channels
instead, the last 3 rows of x (and in the backward of g) carried in registers from one row to
the next: no ring, no barrier. Compiled, a program still waits on each row's loads before the
next row's are issued (Triton pipelines only loads that feed a dot), so the bytes in flight are
a row's a program (causal-conv1d's backward moves its bytes at ~1.3 TB/s, a third of the
HBM's, and so did this one). A program walks STREAM_SEGMENTS runs of rows side by side, the
rows of one tile.

The globals below choose the kernels and their tiles; benchmarks/conv_kernel.py sweeps them by
TILE_KEYS' tokens, and TOOLKIT_CONV_TILES (e.g. "t2_h512_w8") sets them in a process.
"""

import os
import re

import torch

from toolkit.model.kernels import triton_imports

if triton_imports():
    import triton
    import triton.language as tl

    @triton.jit
    def _row_offsets(rows, stride):
        """rows x stride as a [BL, 1] column in 64 bits: a long sequence of a wide row (the
        8B's in_proj: 18,560 elements) passes 2^31 elements within one sequence."""
        return rows.to(tl.int64)[:, None] * stride

    @triton.jit
    def _tap(x_row, rows, shift, cols, col_ok, L, stride_l):
        """x[t - shift] for the tile's rows, fp32, zeros outside the sequence."""
        t = rows - shift
        ok = ((t >= 0) & (t < L))[:, None] & col_ok[None, :]
        return tl.load(x_row + _row_offsets(t, stride_l) + cols[None, :], mask=ok, other=0.0).to(
            tl.float32
        )

    @triton.jit
    def _weight_row(weight, cols, col_ok, j: tl.constexpr, K: tl.constexpr):
        """w[c, j] as a [BC] fp32 row; zeros for a padding tap (j < 0)."""
        if j >= 0:
            w = tl.load(weight + cols * K + j, mask=col_ok, other=0.0).to(tl.float32)
        else:
            w = tl.zeros(cols.shape, dtype=tl.float32)
        return w

    @triton.jit
    def _taps(weight, cols, col_ok, K: tl.constexpr):
        """The conv's weight as 4 taps of [BC] fp32 rows, the first 4 - K of them zero."""
        PAD: tl.constexpr = 4 - K
        w0 = _weight_row(weight, cols, col_ok, 0 - PAD, K)
        w1 = _weight_row(weight, cols, col_ok, 1 - PAD, K)
        w2 = _weight_row(weight, cols, col_ok, 2 - PAD, K)
        w3 = _weight_row(weight, cols, col_ok, 3 - PAD, K)
        return w0, w1, w2, w3

    @triton.jit
    def _weight_tap(weight, cols, col_ok, j: tl.constexpr, K: tl.constexpr):
        """w[c, j] as a [1, BC] fp32 row of a tile."""
        return _weight_row(weight, cols, col_ok, j, K)[None, :]

    @triton.jit
    def _bias_1d(bias, cols, col_ok, HAS_BIAS: tl.constexpr):
        """The bias as a [BC] fp32 row; zeros without one."""
        if HAS_BIAS:
            b = tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)
        else:
            b = tl.zeros(cols.shape, dtype=tl.float32)
        return b

    @triton.jit
    def _bias_row(bias, cols, col_ok, HAS_BIAS: tl.constexpr):
        """The bias as a [1, BC] fp32 row of a tile."""
        return _bias_1d(bias, cols, col_ok, HAS_BIAS)[None, :]

    @triton.jit
    def _preactivation(x_row, rows, cols, col_ok, weight, bias, L, stride_l,
                       K: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
        """bias + sum_j w[c, j] x[t - (K - 1) + j] for the tile's rows `rows` [BL] and channels
        `cols` [BC], in fp32; x_row points at this sequence's row 0."""
        acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
        acc += _bias_row(bias, cols, col_ok, HAS_BIAS)
        for j in tl.static_range(K):
            x_j = _tap(x_row, rows, K - 1 - j, cols, col_ok, L, stride_l)
            acc += x_j * _weight_tap(weight, cols, col_ok, j, K)
        return acc

    @triton.jit
    def _conv_silu_fwd_kernel(x, weight, bias, out, L, C, sx_b, sx_l, so_b, so_l,
                              K: tl.constexpr, HAS_BIAS: tl.constexpr, BL: tl.constexpr,
                              BC: tl.constexpr):  # fmt: skip
        pid_l, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_l * BL + tl.arange(0, BL)
        cols = pid_c * BC + tl.arange(0, BC)
        col_ok = cols < C
        a = _preactivation(x + b.to(tl.int64) * sx_b, rows, cols, col_ok, weight, bias, L, sx_l,
                           K, HAS_BIAS)  # fmt: skip
        y = a * tl.sigmoid(a)
        ok = (rows < L)[:, None] & col_ok[None, :]
        dst = out + b.to(tl.int64) * so_b + _row_offsets(rows, so_l) + cols[None, :]
        tl.store(dst, y.to(out.dtype.element_ty), mask=ok)

    @triton.jit
    def _ring_tile(ring_at, ring_rows, BC: tl.constexpr, ROWS: tl.constexpr):
        """The ring's rows `ring_rows` (mod its ROWS), from L2 (.cg: another thread stored
        them, after a barrier)."""
        return tl.load(ring_at + (ring_rows % ROWS)[:, None] * BC, cache_modifier=".cg")

    @triton.jit
    def _store_tap_sum(at, dw, j: tl.constexpr, col_ok):
        """A tap's weight gradient summed over its rows into at[j]; a padding tap's not."""
        if j >= 0:
            tl.store(at + j, tl.sum(dw, axis=0), mask=col_ok)

    @triton.jit
    def _store_weight_grads(dw_part, db_part, part, C, cols, col_ok, dw0, dw1, dw2, dw3, db,
                            K: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
        """A backward program's part `part` of the weight's gradient (its 4 taps' sums over
        the rows of dw0..dw3, the padding taps' not) and of the bias's, for torch to sum over
        the programs."""
        PAD: tl.constexpr = 4 - K
        at = dw_part + (part * C + cols) * K
        _store_tap_sum(at, dw0, 0 - PAD, col_ok)
        _store_tap_sum(at, dw1, 1 - PAD, col_ok)
        _store_tap_sum(at, dw2, 2 - PAD, col_ok)
        _store_tap_sum(at, dw3, 3 - PAD, col_ok)
        if HAS_BIAS:
            tl.store(db_part + part * C + cols, tl.sum(db, axis=0), mask=col_ok)

    @triton.jit
    def _conv_silu_bwd_kernel(x, weight, bias, dout, dx, dw_part, db_part, ring, L, C, sx_b,
                              sx_l, sd_b, sd_l, sdx_b, sdx_l, ROWS: tl.constexpr,
                              K: tl.constexpr, HAS_BIAS: tl.constexpr, BL: tl.constexpr,
                              BC: tl.constexpr, SLOTS: tl.constexpr):  # fmt: skip
        """One program: ROWS rows of BC channels of one sequence, BL rows a tile, in order. The
        conv is taken as 4 taps, the first 4 - K of them zero (K <= 4): x[t - 3 + j] is loaded
        once a tile for tap j and serves both the pre-activation a and the weight's gradient.
        g = dout silu'(a) of each tile is computed once, into the program's ring of SLOTS tiles
        (a few KB, in L2), from which the next pass reads it shifted: dx[t] = sum_s w[3 - s]
        g[t + s] for the tile before (a tile of g past the program's rows is computed for its
        last one). dw[j] = sum_t g[t] x[t - 3 + j] and db = sum_t g[t] are kept per row and
        channel in registers and summed over the rows once, at the end. With 2 slots a second
        barrier a tile keeps the next tile's store off the slot still being read; with 3 the
        slot stored is never one being read, and the first barrier of the next tile orders
        the rest."""
        pid_l, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = pid_c * BC + tl.arange(0, BC)
        col_ok = cols < C
        x_row = x + b.to(tl.int64) * sx_b
        d_row = dout + b.to(tl.int64) * sd_b
        part = (b * tl.num_programs(0) + pid_l).to(tl.int64)
        program = part * tl.num_programs(1) + pid_c
        tile = tl.arange(0, BL)
        ring_at = ring + program * (SLOTS * BL * BC) + tl.arange(0, BC)[None, :]
        w0, w1, w2, w3 = _taps(weight, cols, col_ok, K)
        w0, w1, w2, w3 = w0[None, :], w1[None, :], w2[None, :], w3[None, :]
        bias_row = _bias_row(bias, cols, col_ok, HAS_BIAS)
        dw0 = tl.zeros((BL, BC), dtype=tl.float32)
        dw1 = tl.zeros((BL, BC), dtype=tl.float32)
        dw2 = tl.zeros((BL, BC), dtype=tl.float32)
        dw3 = tl.zeros((BL, BC), dtype=tl.float32)
        db = tl.zeros((BL, BC), dtype=tl.float32)
        first = pid_l * ROWS
        tiles = tl.cdiv(tl.minimum(first + ROWS, L) - first, BL)
        for i in range(0, tiles + 1):
            rows = first + i * BL + tile
            x0 = _tap(x_row, rows, 3, cols, col_ok, L, sx_l)
            x1 = _tap(x_row, rows, 2, cols, col_ok, L, sx_l)
            x2 = _tap(x_row, rows, 1, cols, col_ok, L, sx_l)
            x3 = _tap(x_row, rows, 0, cols, col_ok, L, sx_l)
            a = bias_row + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
            ok = (rows < L)[:, None] & col_ok[None, :]
            d = tl.load(d_row + _row_offsets(rows, sd_l) + cols[None, :], mask=ok, other=0.0)
            sig = tl.sigmoid(a)
            g = d.to(tl.float32) * sig * (1.0 + a * (1.0 - sig))  # zero past L
            gm = g * (i < tiles).to(tl.float32)  # the tile past the program's rows: dx only
            dw0 += gm * x0
            dw1 += gm * x1
            dw2 += gm * x2
            dw3 += gm * x3
            db += gm
            tl.store(ring_at + ((i % SLOTS) * BL + tile)[:, None] * BC, g)
            tl.debug_barrier()  # the tile's g, stored by all threads, is read shifted below
            if i > 0:  # dx of the tile before: its g and this one's first 3 rows
                prev = rows - BL
                r = (i - 1) * BL + tile
                dx_acc = (w3 * _ring_tile(ring_at, r, BC, SLOTS * BL)
                          + w2 * _ring_tile(ring_at, r + 1, BC, SLOTS * BL)
                          + w1 * _ring_tile(ring_at, r + 2, BC, SLOTS * BL)
                          + w0 * _ring_tile(ring_at, r + 3, BC, SLOTS * BL))  # fmt: skip
                okp = (prev < L)[:, None] & col_ok[None, :]
                dst = dx + b.to(tl.int64) * sdx_b + _row_offsets(prev, sdx_l) + cols[None, :]
                tl.store(dst, dx_acc.to(dx.dtype.element_ty), mask=okp)
            if SLOTS == 2:
                tl.debug_barrier()  # all reads of the older slot done before the next store
        _store_weight_grads(dw_part, db_part, part, C, cols, col_ok, dw0, dw1, dw2, dw3, db, K,
                            HAS_BIAS)  # fmt: skip

    @triton.jit
    def _stream_row(base, rows, stride_l, cols, col_ok, L):
        """Rows `rows` [S] of a sequence at `base` over `cols` [BC] as [S, BC] fp32, zeros
        outside [0, L)."""
        ok = col_ok[None, :] & ((rows >= 0) & (rows < L))[:, None]
        at = base + rows.to(tl.int64)[:, None] * stride_l + cols[None, :]
        return tl.load(at, mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _stream_start(weight, bias, x_row, pid_l, cols, col_ok, L, sx_l, ROWS: tl.constexpr,
                      SEGMENTS: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
        """A stream program's 4 weight taps and bias as [1, BC] rows, its segments' first rows
        [S] and ends (past their last rows, at most L), and the 3 rows of x before each first
        row ([S, BC] each)."""
        w0, w1, w2, w3 = _taps(weight, cols, col_ok, K)
        bias_row = _bias_1d(bias, cols, col_ok, HAS_BIAS)[None, :]
        starts = (pid_l * SEGMENTS + tl.arange(0, SEGMENTS)) * ROWS
        ends = tl.minimum(starts + ROWS, L)
        x3 = _stream_row(x_row, starts - 3, sx_l, cols, col_ok, L)
        x2 = _stream_row(x_row, starts - 2, sx_l, cols, col_ok, L)
        x1 = _stream_row(x_row, starts - 1, sx_l, cols, col_ok, L)
        w0, w1, w2, w3 = w0[None, :], w1[None, :], w2[None, :], w3[None, :]
        return w0, w1, w2, w3, bias_row, starts, ends, x3, x2, x1

    @triton.jit
    def _conv_silu_fwd_stream_kernel(x, weight, bias, out, L, C, sx_b, sx_l, so_b, so_l,
                                     ROWS: tl.constexpr, SEGMENTS: tl.constexpr,
                                     K: tl.constexpr, HAS_BIAS: tl.constexpr,
                                     BC: tl.constexpr):  # fmt: skip
        """One program: SEGMENTS runs of ROWS rows of one sequence, BC channels, a row of each
        run at a time, the last 3 rows of x carried in registers (no row read twice but the 3
        before each run)."""
        pid_l, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = pid_c * BC + tl.arange(0, BC)
        col_ok = cols < C
        x_row = x + b.to(tl.int64) * sx_b
        o_row = out + b.to(tl.int64) * so_b
        w0, w1, w2, w3, bias_row, starts, ends, x3, x2, x1 = _stream_start(
            weight, bias, x_row, pid_l, cols, col_ok, L, sx_l, ROWS, SEGMENTS, K, HAS_BIAS
        )
        for i in range(0, ROWS):
            rows = starts + i
            x0 = _stream_row(x_row, rows, sx_l, cols, col_ok, L)
            a = bias_row + w0 * x3 + w1 * x2 + w2 * x1 + w3 * x0
            y = a * tl.sigmoid(a)
            dst = o_row + rows.to(tl.int64)[:, None] * so_l + cols[None, :]
            ok = col_ok[None, :] & (rows < ends)[:, None]
            tl.store(dst, y.to(out.dtype.element_ty), mask=ok)
            x3, x2, x1 = x2, x1, x0

    @triton.jit
    def _conv_silu_bwd_stream_kernel(x, weight, bias, dout, dx, dw_part, db_part, L, C, sx_b,
                                     sx_l, sd_b, sd_l, sdx_b, sdx_l, ROWS: tl.constexpr,
                                     SEGMENTS: tl.constexpr, K: tl.constexpr,
                                     HAS_BIAS: tl.constexpr, BC: tl.constexpr):  # fmt: skip
        """One program: SEGMENTS runs of ROWS rows of one sequence, BC channels, a row of each
        run at a time, with no barrier and no memory between rows: the last 3 rows of x and of
        g = dout silu'(a) carried in registers. Row t's g completes dx[t - 3] = w3 g[t - 3] +
        w2 g[t - 2] + w1 g[t - 1] + w0 g[t] (the ring kernel's sum); a run goes 3 rows past
        its own (g for dx only) and keeps dw[j] = sum_t g[t] x[t - 3 + j] and db = sum_t g[t]
        per channel, summed over the runs here and over programs by torch."""
        pid_l, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = pid_c * BC + tl.arange(0, BC)
        col_ok = cols < C
        x_row = x + b.to(tl.int64) * sx_b
        d_row = dout + b.to(tl.int64) * sd_b
        dx_row = dx + b.to(tl.int64) * sdx_b
        w0, w1, w2, w3, bias_row, starts, ends, x3, x2, x1 = _stream_start(
            weight, bias, x_row, pid_l, cols, col_ok, L, sx_l, ROWS, SEGMENTS, K, HAS_BIAS
        )
        g3 = tl.zeros((SEGMENTS, BC), dtype=tl.float32)
        g2 = tl.zeros((SEGMENTS, BC), dtype=tl.float32)
        g1 = tl.zeros((SEGMENTS, BC), dtype=tl.float32)
        dw0 = tl.zeros((SEGMENTS, BC), dtype=tl.float32)
        dw1 = tl.zeros((SEGMENTS, BC), dtype=tl.float32)
        dw2 = tl.zeros((SEGMENTS, BC), dtype=tl.float32)
        dw3 = tl.zeros((SEGMENTS, BC), dtype=tl.float32)
        db = tl.zeros((SEGMENTS, BC), dtype=tl.float32)
        for i in range(0, ROWS + 3):
            rows = starts + i
            x0 = _stream_row(x_row, rows, sx_l, cols, col_ok, L)
            d = _stream_row(d_row, rows, sd_l, cols, col_ok, L)
            a = bias_row + w0 * x3 + w1 * x2 + w2 * x1 + w3 * x0
            sig = tl.sigmoid(a)
            g = d * sig * (1.0 + a * (1.0 - sig))  # zero past L
            gm = g * (rows < ends).to(tl.float32)[:, None]  # rows past the run's: dx only
            dw0 += gm * x3
            dw1 += gm * x2
            dw2 += gm * x1
            dw3 += gm * x0
            db += gm
            dx_t = w3 * g3 + w2 * g2 + w1 * g1 + w0 * g
            done = rows - 3  # dx's row, whole now
            dst = dx_row + done.to(tl.int64)[:, None] * sdx_l + cols[None, :]
            ok = col_ok[None, :] & ((done >= starts) & (done < ends))[:, None]
            tl.store(dst, dx_t.to(dx.dtype.element_ty), mask=ok)
            x3, x2, x1 = x2, x1, x0
            g3, g2, g1 = g2, g1, g
        part = (b * tl.num_programs(0) + pid_l).to(tl.int64)
        _store_weight_grads(dw_part, db_part, part, C, cols, col_ok, dw0, dw1, dw2, dw3, db, K,
                            HAS_BIAS)  # fmt: skip


# Tile: 32 rows (the backward's: 16, it keeps 5 accumulators a tile) of 128 channels (16-byte
# loads of 8 bf16 channels); a backward program walks 512 rows, so the weight's partial sums
# are 1/512 of x. Globals: benchmarks/conv_kernel.py's variants set them.
BLOCK_ROWS, BLOCK_CHANNELS, ROWS_PER_PROGRAM, NUM_WARPS = 32, 128, 512, 4
BACKWARD_BLOCK_ROWS = 16
# Tiles in the backward's ring: 2 (measured), or 3 (one barrier a tile instead of two; not yet
# measured on a GPU: benchmarks/conv_kernel.py --variants s3).
RING_SLOTS = 2
# STREAM (TOOLKIT_CONV_STREAM): 1 both passes a row at a time (the _stream kernels: STREAM_ROWS
# rows of STREAM_CHANNELS channels a program, the loads of the next rows in flight over
# STREAM_STAGES stages) in place of the tiles above, 2 the backward alone (the tiled forward
# was as fast as causal-conv1d's, the stream one 1.5x slower: RESULTS.md 2026-12-07 late night).
STREAM = int(os.environ.get("TOOLKIT_CONV_STREAM", "0"))
STREAM_ROWS, STREAM_CHANNELS, STREAM_STAGES = 256, 512, 3  # the fastest of one run
# Runs of STREAM_ROWS rows a program, walked side by side as the rows of one [runs, channels]
# tile: that many rows' loads in flight a stage (one run kept only 1-2 KB a tensor in flight:
# causal-conv1d's speed, not the HBM's, RESULTS.md 2026-12-07 late night).
STREAM_SEGMENTS = 1
# A program keeps about one row in flight: Triton's pipeliner leaves loads that feed no dot
# out of its stages (no shared memory at any STREAM_STAGES: benchmarks/kernel_resources.py
# --conv), rows carried by hand are waited on at the loop's end, and asking the L2 for rows 8,
# 16 or 32 ahead (PTX prefetch.global.L2) made the backward slower (0.36-0.48 against 0.30
# ms on an H100: RESULTS.md 2026-12-07 21:25-23:00, removed).

# One letter a global, followed by its value, '_' between: "t2_h512_w8" is STREAM=2,
# STREAM_CHANNELS=512, NUM_WARPS=8.
TILE_KEYS = {"b": "BLOCK_ROWS", "g": "BACKWARD_BLOCK_ROWS", "c": "BLOCK_CHANNELS",
             "r": "ROWS_PER_PROGRAM", "w": "NUM_WARPS", "s": "RING_SLOTS", "t": "STREAM",
             "q": "STREAM_ROWS", "h": "STREAM_CHANNELS", "n": "STREAM_STAGES",
             "p": "STREAM_SEGMENTS"}  # fmt: skip


def tile_values(tiles: str) -> dict[str, int]:
    """'t1_p4_q64' -> {global: value} by TILE_KEYS; ValueError naming a token it cannot read."""
    values = {}
    for token in tiles.split("_"):
        if not re.fullmatch(rf"[{''.join(TILE_KEYS)}]\d+", token):
            raise ValueError(
                f"conv tiles {tiles!r}: {token!r} is not one of {sorted(TILE_KEYS)} followed by "
                f"a number (e.g. t2_h512_w8)"
            )
        values[TILE_KEYS[token[0]]] = int(token[1:])
    return values


if os.environ.get("TOOLKIT_CONV_TILES"):
    try:
        globals().update(tile_values(os.environ["TOOLKIT_CONV_TILES"]))
    except ValueError as e:
        raise ValueError(f"TOOLKIT_CONV_TILES: {e}") from None


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"x must be [b, l, c] with adjacent channels, got {tuple(x.stride())}")
    if weight.dim() != 2 or weight.size(0) != x.size(2) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [c, k], got {tuple(weight.shape)}")
    if STREAM not in (0, 1, 2):
        raise ValueError(f"conv_kernel.STREAM must be 0, 1 or 2, got {STREAM}")


def conv_silu_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """silu(causal depthwise conv(x) + bias) -> a contiguous [b, l, c] in x's dtype. x [b, l, c]
    with adjacent channels (any row and batch strides: a slice of in_proj's output), weight
    [c, k] contiguous, bias [c] or None."""
    _check(x, weight)
    b, L, C = x.shape
    out = torch.empty(b, L, C, dtype=x.dtype, device=x.device)
    if STREAM == 1:
        _check_stream()
        grid = (triton.cdiv(L, STREAM_ROWS * STREAM_SEGMENTS), triton.cdiv(C, STREAM_CHANNELS), b)
        _conv_silu_fwd_stream_kernel[grid](
            x, weight, x if bias is None else bias, out, L, C, x.stride(0), x.stride(1),
            out.stride(0), out.stride(1), ROWS=STREAM_ROWS, SEGMENTS=STREAM_SEGMENTS,
            K=weight.size(1), HAS_BIAS=bias is not None, BC=STREAM_CHANNELS,
            num_warps=NUM_WARPS, num_stages=STREAM_STAGES,
        )  # fmt: skip
        return out
    grid = (triton.cdiv(L, BLOCK_ROWS), triton.cdiv(C, BLOCK_CHANNELS), b)
    _conv_silu_fwd_kernel[grid](
        x, weight, x if bias is None else bias, out, L, C, x.stride(0), x.stride(1),
        out.stride(0), out.stride(1), K=weight.size(1), HAS_BIAS=bias is not None,
        BL=BLOCK_ROWS, BC=BLOCK_CHANNELS, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def conv_silu_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dout: torch.Tensor,
    dx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradients of conv_silu_forward: (dx, dweight, dbias). dx is written into `dx` when
    given (a [b, l, c] view with adjacent channels: the fused op's slice of in_proj's
    gradient), else into a new tensor; dweight and dbias come in the weight's and bias's
    dtypes."""
    _check(x, weight)
    if dout.shape != x.shape or dout.stride(2) != 1:
        raise ValueError(f"dout must be {tuple(x.shape)} with adjacent channels")
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif dx.shape != x.shape or dx.stride(2) != 1:
        raise ValueError(f"dx must be {tuple(x.shape)} with adjacent channels")
    b, L, C = x.shape
    k = weight.size(1)
    if not 1 <= k <= 4:
        raise ValueError(f"the backward takes conv widths of 1 to 4, got {k}")
    if RING_SLOTS not in (2, 3):
        raise ValueError(f"RING_SLOTS must be 2 or 3, got {RING_SLOTS}")
    if ROWS_PER_PROGRAM % BACKWARD_BLOCK_ROWS or BACKWARD_BLOCK_ROWS < 3:
        # a program's last tile would reach into the next one's rows; a shift of 3 rows must
        # stay within the ring's next tile
        raise ValueError(
            f"ROWS_PER_PROGRAM ({ROWS_PER_PROGRAM}) must be a multiple of BACKWARD_BLOCK_ROWS "
            f"({BACKWARD_BLOCK_ROWS}), which must be at least 3"
        )
    rows, channels = (
        (STREAM_ROWS * STREAM_SEGMENTS, STREAM_CHANNELS)
        if STREAM
        else (ROWS_PER_PROGRAM, BLOCK_CHANNELS)
    )
    programs_l, programs_c = triton.cdiv(L, rows), triton.cdiv(C, channels)
    dw_part = torch.zeros(b * programs_l, C, k, dtype=torch.float32, device=x.device)
    db_part = torch.zeros(b * programs_l, C, dtype=torch.float32, device=x.device)
    if STREAM:
        _check_stream()
        _conv_silu_bwd_stream_kernel[(programs_l, programs_c, b)](
            x, weight, x if bias is None else bias, dout, dx, dw_part, db_part, L, C,
            x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dx.stride(0),
            dx.stride(1), ROWS=STREAM_ROWS, SEGMENTS=STREAM_SEGMENTS, K=k,
            HAS_BIAS=bias is not None, BC=channels, num_warps=NUM_WARPS,
            num_stages=STREAM_STAGES,
        )  # fmt: skip
        return _summed(dx, dw_part, db_part, weight, bias)
    ring = torch.empty(
        b * programs_l * programs_c, RING_SLOTS * BACKWARD_BLOCK_ROWS, BLOCK_CHANNELS,
        dtype=torch.float32, device=x.device,
    )  # fmt: skip
    grid = (programs_l, programs_c, b)
    _conv_silu_bwd_kernel[grid](
        x, weight, x if bias is None else bias, dout, dx, dw_part, db_part, ring, L, C,
        x.stride(0),
        x.stride(1), dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
        ROWS=ROWS_PER_PROGRAM, K=k, HAS_BIAS=bias is not None, BL=BACKWARD_BLOCK_ROWS,
        BC=BLOCK_CHANNELS, SLOTS=RING_SLOTS, num_warps=NUM_WARPS,
    )  # fmt: skip
    return _summed(dx, dw_part, db_part, weight, bias)


def _check_stream() -> None:
    for name in ("STREAM_SEGMENTS", "STREAM_CHANNELS"):
        value = globals()[name]
        if value < 1 or value & (value - 1):
            raise ValueError(f"conv_kernel.{name} must be a power of 2, got {value}")


def _summed(dx, dw_part, db_part, weight, bias):
    """(dx, the weight's and bias's gradients summed over the programs' parts, in their
    dtypes)."""
    dbias = None if bias is None else db_part.sum(0).to(bias.dtype)
    return dx, dw_part.sum(0).to(weight.dtype), dbias
