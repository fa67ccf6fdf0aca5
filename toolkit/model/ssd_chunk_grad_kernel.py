"""The Mamba-2 SSD's gradients within each chunk as Triton kernels, for our fused training op's
backward (fused_mamba.ssd_backward_from_states), after the chunk-state gradients
(ssd_state_grad_kernel.py): with them, the whole SSD backward from the kept states in four
launches, against mamba-ssm's ten kernels and its torch sums.

- _ssd_head_grad_kernel, a program per chunk and head: x's gradient, dt's (before the softplus),
  dA's (each step's dt * A, summed in mamba-ssm's stable order, never a difference of
  cumulative sums) and the head's parts of A's, D's and dt_bias's.
- _ssd_bc_grad_kernel, a program per chunk, head group and block of the chunk's rows: dC's rows
  (WHICH 0) or dB's (1), each head's part added in registers and written once; optionally what
  dA's gradient gets through the states by row, and (the dC kernel) within the chunks
  (ssd_bc_grads), for the op's "bc" path (a default), where mamba-ssm's dx and within-chunk dA
  kernels (0.83 ms against our head kernel's 1.28) go with these, or its dx kernel alone ("bc"
  and "ddacs"). On an H100 at the 800M's widths and micro-batch 8 (RESULTS.md 2026-12-07) the
  two take 0.94 ms with dA's rows at 8 warps (1.17 at 4, where the rows add ~800 bytes of
  spills a thread: benchmarks/kernel_resources.py), 0.76 without, and replace four of
  mamba-ssm's kernels (0.94 ms) and the torch sums of its wrappers (~0.4 ms): the SSD backward
  1.20x; with the within-chunk dA too 1.44 ms at 8 warps, against 0.94 + mamba-ssm's 0.30.

The first version held a whole chunk's 128 x 128 fp32 tiles and two sums over the heads in one
program (255 registers and 3-6 KB of spills a thread: 0.28x mamba-ssm's kernels on the H100).
These take the chunk's rows 16 at a time (head kernel, 4 warps) and 64 a program (dC's and dB's
kernels, 4 warps; fewer rows re-read the heads' fp32 states per row block: 16 took 3x as long).
On an H100 (RESULTS.md 2026-12-06 late) their GPU time matches the mamba-ssm kernels they
replace at the 800M's widths (2.32 vs 2.34 ms with the state gradients) and is 0.19 ms over at
the 8B's (1.10 vs 0.91): dC's and dB's are faster than mamba-ssm's five, the head kernel slower
than its two (1.28 vs 0.83 ms at the 800M's widths). The op takes them where
TOOLKIT_TRITON_MAMBA names "dx" (a step of the 800M at micro-batch 4: 187.1 ms with, 187.9
without, within a call's noise). The head kernel split into blocks of x's rows (a program per
chunk, head and block, against dy's causal blocks only, dA's gradient added by atomics; a
quarter of the spills) was slower at every setting (800M: 1.46-3.41 ms; 8B 0.73-1.70): removed.

With s the sums of dA within a chunk, S the state passed in, G the gradient of the one passed
on and w_j = exp(s_last - s_j) dt_j, the chunk's outputs are y_i = exp(s_i) C_i S^T +
sum_{j <= i} (C_i . B_j) exp(s_i - s_j) dt_j x_j + D x_i, and it passes on exp(s_last) S +
sum_j w_j x_j B_j^T, so
    dC_i = exp(s_i) dy_i S + sum_j dCB_ij B_j,   dB_j = w_j x_j G + sum_i dCB_ij C_i,
    dx_j = w_j B_j G^T + sum_i (C_i . B_j) exp(s_i - s_j) dt_j dy_i + D dy_j,
with dCB_ij = (dy_i . x_j) exp(s_i - s_j) dt_j (j <= i, summed over the group's heads).
"""

from typing import NamedTuple

import torch

from toolkit.model.kernels import triton_imports

BLOCK_M = 16  # the chunk's rows a step of the head kernel
BC_BLOCK_M = 64  # the chunk's rows a program of the B/C kernels (each reads its heads' states)
NUM_WARPS = 4  # the head kernel's
# 8: with dA's rows 0.94 ms against 4 warps' 1.16 at the 800M's widths and micro-batch 8 on an
# H100 (fewer spills), without them level (0.77 against 0.76; RESULTS.md 2026-12-07 late morning)
BC_NUM_WARPS = 8
NUM_STAGES = 1
DT_BLOCK_H = 4  # heads a program of the dt kernel (each all of a chunk's steps)


class DARows(NamedTuple):
    """dA's gradient through the SSD's states by row, [b, h, chunks, chunk] fp32 (the B/C
    kernels'), before it is summed along the chunk into each step's (dA_grads, ssd_dt_grads)."""

    into_outputs: torch.Tensor  # row i: what output i reads of the state passed in
    onto_state: torch.Tensor  # row j: what step j adds to the state passed on
    last: torch.Tensor  # [b, h, chunks]: the chunk's last dA sum's, through the state passed on
    # each step's within the chunk (the C Bt pairs': our dC kernel's or mamba-ssm's), or None
    within: torch.Tensor | None


if triton_imports():
    import triton
    import triton.language as tl

    @triton.jit
    def _ssd_head_grad_kernel(x, dy, dt_soft, dA_sums, B, C, states, dstates, ddA_last, dt, A,
                              dt_bias, D, dx, ddt, dA_part, dD_part, dbias_part, L, stride_x_b,
                              stride_x_l, stride_x_h, stride_dy_b, stride_dy_l, stride_dy_h,
                              stride_bc_b, stride_bc_l, stride_bc_g, stride_dx_b, stride_dx_l,
                              stride_dx_h, stride_dt_b, stride_dt_l, stride_ddt_b, stride_ddt_l,
                              HEADS_PER_GROUP: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                              Q: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
        c, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        CHUNKS, H = tl.num_programs(0), tl.num_programs(1)
        g = h // HEADS_PER_GROUP
        p, n, j = tl.arange(0, P), tl.arange(0, N), tl.arange(0, Q)
        b64 = b.to(tl.int64)
        t = c * Q + j
        t_ok = t < L
        t64 = t.to(tl.int64)
        at = ((b64 * H + h) * CHUNKS + c) * Q  # [b, h, chunks, Q]
        s = tl.load(dA_sums + at + j)
        dt_s = tl.load(dt_soft + at + j)
        last = tl.sum(tl.where(j == Q - 1, s, 0.0), axis=0)
        x_at = b64 * stride_x_b + h * stride_x_h + p[None, :]
        dy_at = b64 * stride_dy_b + h * stride_dy_h + p[None, :]
        bc_at = b64 * stride_bc_b + g * stride_bc_g + n[None, :]
        xc = tl.load(x + x_at + t64[:, None] * stride_x_l, t_ok[:, None], 0.0)
        Bc = tl.load(B + bc_at + t64[:, None] * stride_bc_l, t_ok[:, None], 0.0)
        # [b, chunks, h, P, N]: the state passed in and the gradient of the one passed on
        so = (((b64 * CHUNKS + c) * H + h) * P + p[:, None]) * N + n[None, :]
        state = tl.load(states + so).to(xc.dtype)
        grad = tl.load(dstates + so).to(xc.dtype)
        # through the state passed on, at each step j: dx's w_j B_j G^T, dt_j's and s_j's
        decay_out = tl.exp(last - s)
        w = decay_out * dt_s
        xgb = tl.sum(tl.dot(xc, grad) * Bc.to(tl.float32), axis=1)  # x_j G . B_j
        dt_grad = decay_out * xgb
        out_j = w * xgb
        # each step k's dA gradient from there, with dA_last's through S: sum_{j < k} of s_j's
        dA_step = tl.cumsum(out_j, axis=0) - out_j + tl.load(ddA_last + at // Q)
        dxc = tl.dot(Bc, tl.trans(grad)) * w[:, None]
        for i0 in range(0, Q, BLOCK_M):  # the chunk's outputs, BLOCK_M rows at a time
            i = i0 + tl.arange(0, BLOCK_M)
            ti = c * Q + i
            i_ok = ti < L
            ti64 = ti.to(tl.int64)
            s_i = tl.load(dA_sums + at + i)
            Cb = tl.load(C + bc_at + ti64[:, None] * stride_bc_l, i_ok[:, None], 0.0)
            dyb = tl.load(dy + dy_at + ti64[:, None] * stride_dy_l, i_ok[:, None], 0.0)
            causal = i[:, None] >= j[None, :]
            decay = tl.exp(tl.where(causal, s_i[:, None] - s[None, :], -float("inf")))
            cb = tl.dot(Cb, tl.trans(Bc))
            u = tl.dot(dyb, tl.trans(xc)) * decay  # (dy_i . x_j) exp(s_i - s_j)
            # s's gradient within the chunk: step k's sums the decays that span it (j < k <= i)
            z = u * cb * dt_s[None, :]
            spans = tl.cumsum(z, axis=1) - z  # [i, k]: sum_{j < k} z_ij
            m = cb * decay * dt_s[None, :]
            dxc += tl.dot(tl.trans(m.to(dyb.dtype)), dyb)
            # through the state passed in: s_i's gradient exp(s_i) dy_i S . C_i, at each step
            # k <= i
            ds = tl.sum(tl.dot(dyb, state) * Cb.to(tl.float32), axis=1) * tl.exp(s_i)
            dt_grad += tl.sum(u * cb, axis=0)
            dA_step += tl.sum(tl.where(causal, spans + ds[:, None], 0.0), axis=0)
        part = (b64 * CHUNKS + c) * H + h  # [b, chunks, h]
        if D is not None:
            dyc = tl.load(dy + dy_at + t64[:, None] * stride_dy_l, t_ok[:, None], 0.0)
            dxc += tl.load(D + h).to(tl.float32) * dyc.to(tl.float32)
            tl.store(dD_part + part, tl.sum(dyc.to(tl.float32) * xc.to(tl.float32)))
        dxo = b64 * stride_dx_b + t64[:, None] * stride_dx_l + h * stride_dx_h + p[None, :]
        tl.store(dx + dxo, dxc.to(dx.dtype.element_ty), t_ok[:, None])
        dt_grad += dA_step * tl.load(A + h).to(tl.float32)
        raw = tl.load(dt + b64 * stride_dt_b + t64 * stride_dt_l + h, t_ok, 0.0)
        raw = raw.to(tl.float32) + tl.load(dt_bias + h).to(tl.float32)
        dt_grad = tl.where(raw <= 20.0, dt_grad * tl.sigmoid(raw), dt_grad)  # softplus's slope
        dt_grad = tl.where(t_ok, dt_grad, 0.0)
        tl.store(ddt + b64 * stride_ddt_b + t64 * stride_ddt_l + h, dt_grad, t_ok)
        tl.store(dA_part + part, tl.sum(dA_step * dt_s))
        tl.store(dbias_part + part, tl.sum(dt_grad))

    @triton.jit
    def _ssd_bc_grad_kernel(x, dy, dt_soft, dA_sums, B, C, states, dstates, dB, dC, dA_rows,
                            dA_within, L,
                            stride_x_b, stride_x_l, stride_x_h, stride_dy_b, stride_dy_l,
                            stride_dy_h, stride_bc_b, stride_bc_l, stride_bc_g, stride_dbc_b,
                            stride_dbc_l, stride_dbc_g, HEADS_PER_GROUP: tl.constexpr,
                            P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
                            BLOCK_M: tl.constexpr, WHICH: tl.constexpr):  # fmt: skip
        # program (c, (g, block), b): dC's rows of the block (WHICH 0) or dB's (WHICH 1)
        c, pid, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        CHUNKS = tl.num_programs(0)
        H = (tl.num_programs(1) // (Q // BLOCK_M)) * HEADS_PER_GROUP
        g, block = pid // (Q // BLOCK_M), pid % (Q // BLOCK_M)
        p, n, j = tl.arange(0, P), tl.arange(0, N), tl.arange(0, Q)
        r = block * BLOCK_M + tl.arange(0, BLOCK_M)  # the block's rows in the chunk
        b64 = b.to(tl.int64)
        t, tr = c * Q + j, c * Q + r
        t_ok, r_ok = t < L, tr < L
        t64, tr64 = t.to(tl.int64), tr.to(tl.int64)
        bc_at = b64 * stride_bc_b + g * stride_bc_g + n[None, :]
        grad_sum = tl.zeros([BLOCK_M, N], dtype=tl.float32)
        dcb = tl.zeros([BLOCK_M, Q], dtype=tl.float32)  # [row, the other's step]
        if dA_rows is not None:  # the block's own rows of C (WHICH 0) or B (1), for dA's rows
            mine = tl.load((C if WHICH == 0 else B) + bc_at + tr64[:, None] * stride_bc_l,
                           r_ok[:, None], 0.0)  # fmt: skip
        if dA_within is not None:  # C_i . B_j, the group's, for dA's gradient within the chunk
            Bc = tl.load(B + bc_at + t64[:, None] * stride_bc_l, t_ok[:, None], 0.0)
            cb = tl.dot(mine, tl.trans(Bc))
        for k in range(HEADS_PER_GROUP):
            h = g * HEADS_PER_GROUP + k
            at = ((b64 * H + h) * CHUNKS + c) * Q
            s = tl.load(dA_sums + at + j)
            s_r = tl.load(dA_sums + at + r)
            x_at = b64 * stride_x_b + h * stride_x_h + p[None, :]
            dy_at = b64 * stride_dy_b + h * stride_dy_h + p[None, :]
            so = (((b64 * CHUNKS + c) * H + h) * P + p[:, None]) * N + n[None, :]
            if WHICH == 0:  # dC_i: exp(s_i) dy_i S, dCB_ij over j <= i
                dyr = tl.load(dy + dy_at + tr64[:, None] * stride_dy_l, r_ok[:, None], 0.0)
                state = tl.load(states + so).to(dyr.dtype)
                inflow = tl.dot(dyr, state) * tl.exp(s_r)[:, None]  # exp(s_i) dy_i S
                grad_sum += inflow
                if dA_rows is not None:  # s_i's gradient through S: exp(s_i) dy_i S . C_i
                    tl.store(dA_rows + at + r, tl.sum(inflow * mine.to(tl.float32), axis=1))
                xc = tl.load(x + x_at + t64[:, None] * stride_x_l, t_ok[:, None], 0.0)
                dt_s = tl.load(dt_soft + at + j)
                causal = r[:, None] >= j[None, :]
                decay = tl.exp(tl.where(causal, s_r[:, None] - s[None, :], -float("inf")))
                u = tl.dot(dyr, tl.trans(xc)) * decay * dt_s[None, :]
                dcb += u
                if dA_within is not None:  # step k's: the decays that span it, j < k <= i
                    z = u * cb
                    spans = tl.cumsum(z, axis=1) - z  # [i, k]: sum_{j < k} z_ij
                    tl.atomic_add(dA_within + at + j, tl.sum(tl.where(causal, spans, 0.0), 0))
            else:  # dB_j: w_j x_j G, dCB_ij over i >= j
                xr = tl.load(x + x_at + tr64[:, None] * stride_x_l, r_ok[:, None], 0.0)
                grad = tl.load(dstates + so).to(xr.dtype)
                last = tl.sum(tl.where(j == Q - 1, s, 0.0), axis=0)
                dt_r = tl.load(dt_soft + at + r)
                outflow = tl.dot(xr, grad) * (tl.exp(last - s_r) * dt_r)[:, None]  # w_j x_j G
                grad_sum += outflow
                if dA_rows is not None:  # what step j adds to the state passed on: w_j x_j G . B_j
                    tl.store(dA_rows + at + r, tl.sum(outflow * mine.to(tl.float32), axis=1))
                dyc = tl.load(dy + dy_at + t64[:, None] * stride_dy_l, t_ok[:, None], 0.0)
                causal = j[None, :] >= r[:, None]
                decay = tl.exp(tl.where(causal, s[None, :] - s_r[:, None], -float("inf")))
                dcb += tl.dot(xr, tl.trans(dyc)) * decay * dt_r[:, None]
        # the other of B and C, whole, loaded last (registers): dC reads B, dB reads C
        if WHICH == 0:
            other = tl.load(B + bc_at + t64[:, None] * stride_bc_l, t_ok[:, None], 0.0)
        else:
            other = tl.load(C + bc_at + t64[:, None] * stride_bc_l, t_ok[:, None], 0.0)
        grad_sum += tl.dot(dcb.to(other.dtype), other)
        dbc = b64 * stride_dbc_b + tr64[:, None] * stride_dbc_l + g * stride_dbc_g + n[None, :]
        if WHICH == 0:
            tl.store(dC + dbc, grad_sum.to(dC.dtype.element_ty), r_ok[:, None])
        else:
            tl.store(dB + dbc, grad_sum.to(dB.dtype.element_ty), r_ok[:, None])

    @triton.jit
    def _ssd_dt_grad_kernel(into_outputs, onto_state, last, within, ddt_soft, dt_soft, dt, A,
                            dt_bias, ddt, parts, L, H, stride_dt_b, stride_dt_l, stride_ddt_b,
                            stride_ddt_l, Q: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
        # program (c, block of heads, b): each step's dA gradient from dA's rows, then dt's
        # (before the softplus), and the chunk's parts of A's and dt_bias's
        c, hb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        CHUNKS = tl.num_programs(0)
        h, q = hb * BLOCK_H + tl.arange(0, BLOCK_H), tl.arange(0, Q)
        b64 = b.to(tl.int64)
        t = c * Q + q
        h_ok = h < H
        ok = h_ok[:, None] & (t < L)[None, :]
        row = (b64 * H + h) * CHUNKS + c  # [b, h, chunks]
        at = row[:, None] * Q + q[None, :]
        # step k's dA decays S into the outputs from k on (a sum from the chunk's end), the
        # steps before k into the state passed on, and S into that one at every step
        ins = tl.load(into_outputs + at, ok, 0.0)
        outs = tl.load(onto_state + at, ok, 0.0)
        ddA = tl.cumsum(ins, axis=1, reverse=True) + (tl.cumsum(outs, axis=1) - outs)
        ddA += tl.load(last + row, h_ok, 0.0)[:, None]
        if within is not None:  # within the chunks
            ddA += tl.load(within + at, ok, 0.0)
        ddA = tl.where(ok, ddA, 0.0)
        # mamba-ssm's _chunk_cumsum_bwd from here: dt's gradient through dA = dt A and directly
        grad = ddA * tl.load(A + h, h_ok, 0.0).to(tl.float32)[:, None]
        grad += tl.load(ddt_soft + at, ok, 0.0)
        t64 = t.to(tl.int64)[None, :]
        raw = tl.load(dt + b64 * stride_dt_b + t64 * stride_dt_l + h[:, None], ok, 0.0)
        raw = raw.to(tl.float32) + tl.load(dt_bias + h, h_ok, 0.0).to(tl.float32)[:, None]
        grad = tl.where(raw <= 20.0, grad * tl.sigmoid(raw), grad)  # softplus's slope
        grad = tl.where(ok, grad, 0.0)
        out = b64 * stride_ddt_b + t64 * stride_ddt_l + h[:, None]
        tl.store(ddt + out, grad.to(ddt.dtype.element_ty), ok)
        part = (b64 * CHUNKS + c) * H + h  # [2, b, chunks, h]: A's, then dt_bias's
        tl.store(parts + part, tl.sum(ddA * tl.load(dt_soft + at, ok, 0.0), axis=1), h_ok)
        tl.store(parts + tl.num_programs(2) * CHUNKS * H + part, tl.sum(grad, axis=1), h_ok)


def ssd_input_grads(
    x: torch.Tensor,
    dy: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    dt_bias: torch.Tensor,
    D: torch.Tensor | None,
    kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    B: torch.Tensor,
    C: torch.Tensor,
    dstates: torch.Tensor,
    ddA_last: torch.Tensor,
    dx: torch.Tensor,
    ddt: torch.Tensor,
    dB: torch.Tensor,
    dC: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The SSD's gradients from x and dy [b, l, h, p], dt before softplus(dt + dt_bias)
    [b, l, h], A, dt_bias and D (or None) [h], kept (the forward's dt after the softplus and dA's
    sums within each chunk [b, h, chunks, chunk] fp32, the states passed into each chunk
    [b, chunks, h, p, n] fp32 or x's dtype), B and C [b, l, g, n], the gradients of the states
    each chunk passes on (dstates, like the states) and of each chunk's last dA sum through it
    (ddA_last [b, h, chunks]; both ssd_state_grad_kernel.ssd_state_grads'): x's, dt's, B's and
    C's written into dx, ddt, dB and dC (their inputs' shapes); (A's, D's or None, dt_bias's)
    [h] fp32 returned. Channels adjacent throughout."""
    if any(t.stride(-1) != 1 for t in (dx, dt, ddt)):
        raise ValueError("x, dy, dt, B, C and their gradients need adjacent channels")
    ssd_bc_grads(x, dy, kept, B, C, dstates, dB, dC)  # first: it checks the rest
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    dt_soft, dA_sums, states = (t.contiguous() for t in kept)
    chunks, chunk_size = dA_sums.shape[2:]
    parts = [torch.empty(b, chunks, H, dtype=torch.float32, device=x.device) for _ in range(3)]
    dA_part, dD_part, dbias_part = parts
    _ssd_head_grad_kernel[(chunks, H, b)](
        x, dy, dt_soft, dA_sums, B, C, states, dstates, ddA_last.contiguous(), dt, A, dt_bias, D,
        dx, ddt, dA_part, dD_part if D is not None else None, dbias_part, L,
        *(t.stride(d) for t in (x, dy, B, dx) for d in (0, 1, 2)), dt.stride(0), dt.stride(1),
        ddt.stride(0), ddt.stride(1), HEADS_PER_GROUP=H // G, P=P, N=N, Q=chunk_size,
        BLOCK_M=min(BLOCK_M, chunk_size), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    dD = dD_part.sum((0, 1)) if D is not None else None
    return dA_part.sum((0, 1)), dD, dbias_part.sum((0, 1))


def ssd_bc_grads(
    x: torch.Tensor,
    dy: torch.Tensor,
    kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    B: torch.Tensor,
    C: torch.Tensor,
    dstates: torch.Tensor,
    dB: torch.Tensor,
    dC: torch.Tensor,
    ddA_last: torch.Tensor | None = None,
    within: bool = False,
) -> "DARows | None":
    """B's and C's gradients (ssd_input_grads' arguments) written into dB and dC; given the
    gradient of each chunk's last dA sum through the state it passes on (ddA_last, as
    ssd_input_grads'), also dA's gradient through the states by row, and with `within` within
    the chunks too (the C Bt pairs' decays), returned (DARows: dA_grads or ssd_dt_grads sum
    them along the chunk)."""
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    chunks, chunk_size = kept[1].shape[2:]
    if any(t.stride(-1) != 1 for t in (x, dy, B, C, dB, dC)):
        raise ValueError("x, dy, dt, B, C and their gradients need adjacent channels")
    if C.stride() != B.stride() or dC.stride() != dB.stride():
        raise ValueError("C's strides must be B's and dC's dB's")
    if H % G or any(v & (v - 1) or v < 16 for v in (chunk_size, N, P)):
        raise ValueError(
            f"heads {H} in {G} groups; chunk {chunk_size}, state {N}, head dim {P}: powers of 2"
            " from 16"
        )
    for name, t in (("states", kept[2]), ("dstates", dstates)):
        if t.shape != (b, chunks, H, P, N) or not t.is_contiguous():
            raise ValueError(f"{name} {tuple(t.shape)}: want contiguous {(b, chunks, H, P, N)}")
    if within and ddA_last is None:
        raise ValueError("dA's gradient within the chunks comes with that through the states")
    dt_soft, dA_sums, states = (t.contiguous() for t in kept)
    block_m = min(BC_BLOCK_M, chunk_size)
    # by row: what output i reads of the state passed in (exp(s_i) dy_i S . C_i, the dC
    # kernel's) and what step j adds to the state passed on (w_j x_j G . B_j, the dB kernel's)
    rows = [torch.empty_like(dA_sums) if ddA_last is not None else None for _ in range(2)]
    ddA_within = torch.zeros_like(dA_sums) if within else None  # the dC kernel's, by atomics
    for which in (0, 1):  # dC, then dB: each its own compiled kernel (registers)
        _ssd_bc_grad_kernel[(chunks, G * (chunk_size // block_m), b)](
            x, dy, dt_soft, dA_sums, B, C, states, dstates, dB, dC, rows[which],
            ddA_within if which == 0 else None, L,
            *(t.stride(d) for t in (x, dy, B, dB) for d in (0, 1, 2)), HEADS_PER_GROUP=H // G,
            P=P, N=N, Q=chunk_size, BLOCK_M=block_m, WHICH=which, num_warps=BC_NUM_WARPS,
            num_stages=NUM_STAGES,
        )  # fmt: skip
    if ddA_last is None:
        return None
    return DARows(*rows, ddA_last, ddA_within)


def dA_grads(rows: DARows) -> torch.Tensor:
    """dA's gradient at each step [b, h, chunks, chunk] fp32 from its rows, by torch (the
    reference of _ssd_dt_grad_kernel's sums): step k's dA decays S into the outputs from k on,
    the steps before k into the state passed on, and S into that one at every step."""
    ddA = rows.into_outputs.flip(-1).cumsum(-1).flip(-1)
    ddA += rows.onto_state.cumsum(-1) - rows.onto_state
    ddA += rows.last[..., None]
    return ddA + rows.within if rows.within is not None else ddA


def ssd_dt_grads(
    rows: DARows,
    ddt_soft: torch.Tensor,
    dt_soft: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    dt_bias: torch.Tensor,
    ddt: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA's gradient summed from its rows (with their part within the chunks, rows.within,
    where given) and through it dt's (before softplus(dt + dt_bias)), written into ddt
    [b, l, h], in one kernel: what dA_grads and then mamba-ssm's _chunk_cumsum_bwd do in ~10
    launches. ddt_soft is the gradient of dt after the softplus by other paths, dt_soft that dt
    as the forward kept it (both [b, h, chunks, chunk]). (A's, dt_bias's) [h] fp32 returned."""
    b, H, chunks, chunk_size = ddt_soft.shape
    rowwise = [rows.into_outputs, rows.onto_state, ddt_soft, dt_soft]
    if rows.within is not None:
        rowwise.append(rows.within)
    if any(t.shape != (b, H, chunks, chunk_size) for t in rowwise) or dt.shape != ddt.shape:
        raise ValueError("dA's rows, dt's gradients and dt want [b, h, chunks, chunk] alike")
    if dt.stride(-1) != 1 or ddt.stride(-1) != 1 or chunk_size & (chunk_size - 1):
        raise ValueError("dt and its gradient need adjacent heads; the chunk a power of 2")
    into_outputs, onto_state, ddt_soft, dt_soft, *within = (t.contiguous() for t in rowwise)
    parts = torch.empty(2, b, chunks, H, dtype=torch.float32, device=dt.device)
    _ssd_dt_grad_kernel[(chunks, triton.cdiv(H, DT_BLOCK_H), b)](
        into_outputs, onto_state, rows.last.contiguous(), within[0] if within else None,
        ddt_soft, dt_soft, dt, A, dt_bias, ddt, parts, dt.size(1), H, dt.stride(0),
        dt.stride(1), ddt.stride(0), ddt.stride(1), Q=chunk_size, BLOCK_H=DT_BLOCK_H,
    )  # fmt: skip
    dA, ddt_bias = parts.sum((1, 2))
    return dA, ddt_bias
