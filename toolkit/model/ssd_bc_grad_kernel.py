"""The Mamba-2 SSD's gradients of B, C and dA as one Triton kernel, for our fused training op's
backward (fused_mamba.ssd_backward_from_states), after the chunk-state gradients
(ssd_state_grad_kernel.py).

mamba-ssm's backward makes them in 6 kernels and some torch sums: dB's and dC's parts through
the states (each with its part of dA's gradient), C Bt's gradient, its two products with B and
C, and dA's gradient within the chunk, each reading x, dy or the states again and the parts
passing through memory in fp32; 1.2 of the SSD backward's 2.3 ms a layer at the 800M's widths
on an H100 (RESULTS.md 2026-12-06 afternoon). Here a program takes one chunk of one sequence
for one group of heads and, head by head, adds each head's part of dB and dC in registers,
writing them once, and writes each head's gradient of dA (each step's dt * A) in fp32, summed
in mamba-ssm's stable order (no difference of cumulative sums). ssd_input_grads has it make x's,
dt's and D's gradients as well, and A's and dt_bias's, which mamba-ssm's backward makes in two
more kernels (one from C Bt made again): with ssd_state_grads, the whole SSD backward from the
kept states in two kernels. Right on an H100 but 0.51x (bc) and 0.28x (dx) mamba-ssm's kernels
at the 800M's widths (RESULTS.md 2026-12-06 evening): a program holds two 128 x 128 fp32 sums
over its heads beside each head's 128 x 128 tiles, too much for its registers. The op takes
them only where TOOLKIT_TRITON_MAMBA names "bc" or "dx" (all of it), for the A/B runs of a
split version (tests/test_ssd_bc_grad_kernel.py, benchmarks/gpu_kernels.py --backward).

With s the sums of dA within a chunk, S the state passed in, G the gradient of the one passed
on and w_j = exp(s_last - s_j) dt_j, the chunk's outputs are y_i = exp(s_i) C_i S^T +
sum_{j <= i} (C_i . B_j) exp(s_i - s_j) dt_j x_j, and it passes on exp(s_last) S + sum_j w_j
x_j B_j^T, so
    dC_i = exp(s_i) dy_i S + sum_j dCB_ij B_j,   dB_j = w_j x_j G + sum_i dCB_ij C_i,
    dx_j = w_j B_j G^T + sum_i (C_i . B_j) exp(s_i - s_j) dt_j dy_i + D dy_j,
with dCB_ij = (dy_i . x_j) exp(s_i - s_j) dt_j (j <= i, summed over the group's heads).
"""

import torch

from toolkit.model.kernels import triton_imports

NUM_WARPS = 8
# 1: the head loop not software-pipelined (its loads multi-buffered in shared memory took 314 KB
# of the H100's 227 at chunk 128, state 128, head dim 64).
NUM_STAGES = 1

if triton_imports():
    import triton
    import triton.language as tl

    @triton.jit
    def _ssd_bc_grad_kernel(x, dy, dt_soft, dA_sums, B, C, states, dstates, ddA_last, dB, dC,
                            ddA, dt, A, dt_bias, D, dx, ddt, dA_part, dD_part, dbias_part, L,
                            stride_x_b, stride_x_l, stride_x_h, stride_dy_b, stride_dy_l,
                            stride_dy_h, stride_bc_b, stride_bc_l, stride_bc_g, stride_dbc_b,
                            stride_dbc_l, stride_dbc_g, stride_dx_b, stride_dx_l, stride_dx_h,
                            stride_dt_b, stride_dt_l, stride_ddt_b, stride_ddt_l,
                            HEADS_PER_GROUP: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                            Q: tl.constexpr):  # fmt: skip
        c, g, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        CHUNKS = tl.num_programs(0)
        H = tl.num_programs(1) * HEADS_PER_GROUP
        p = tl.arange(0, P)
        n = tl.arange(0, N)
        i = tl.arange(0, Q)
        causal = i[:, None] >= i[None, :]
        b64 = b.to(tl.int64)
        t = c * Q + i
        t_ok = t < L
        t64 = t.to(tl.int64)
        rows = t_ok[:, None] & (p[None, :] < P)
        bc = b64 * stride_bc_b + t64[:, None] * stride_bc_l + g * stride_bc_g + n[None, :]
        Bc = tl.load(B + bc, t_ok[:, None], 0.0)
        Cc = tl.load(C + bc, t_ok[:, None], 0.0)
        dB_sum = tl.zeros([Q, N], dtype=tl.float32)
        dC_sum = tl.zeros([Q, N], dtype=tl.float32)
        for k in range(HEADS_PER_GROUP):
            h = g * HEADS_PER_GROUP + k
            at = ((b64 * H + h) * CHUNKS + c) * Q + i  # [b, h, chunks, Q]
            s = tl.load(dA_sums + at)
            dt_s = tl.load(dt_soft + at)
            last = tl.sum(tl.where(i == Q - 1, s, 0.0), axis=0)
            xo = b64 * stride_x_b + t64[:, None] * stride_x_l + h * stride_x_h + p[None, :]
            xc = tl.load(x + xo, rows, 0.0)
            dyo = b64 * stride_dy_b + t64[:, None] * stride_dy_l + h * stride_dy_h + p[None, :]
            dyc = tl.load(dy + dyo, rows, 0.0)
            # [b, chunks, h, P, N]: the state passed in (fp32) and the gradient of the one passed on
            so = (((b64 * CHUNKS + c) * H + h) * P + p[:, None]) * N + n[None, :]
            state = tl.load(states + so).to(xc.dtype)
            grad = tl.load(dstates + so).to(xc.dtype)
            # through the state passed in: exp(s_i) dy_i S, and s_i's gradient from it
            dC_in = tl.dot(dyc, state) * tl.exp(s)[:, None]
            dC_sum += dC_in
            ds = tl.sum(dC_in * Cc.to(tl.float32), axis=1)
            from_in = tl.sum(ds) - tl.cumsum(ds, axis=0) + ds  # step k's: sum_{i >= k}
            # through the state passed on: w_j x_j G, s_j's gradient from it and, with dA_last's
            # through S, each step k's: sum_{j < k} of s_j's
            decay_out = tl.exp(last - s)
            w = decay_out * dt_s
            xg = tl.dot(xc, grad)
            dB_sum += xg * w[:, None]
            xgb = tl.sum(xg * Bc.to(tl.float32), axis=1)
            out_j = w * xgb
            from_out = tl.cumsum(out_j, axis=0) - out_j
            from_out += tl.load(ddA_last + (b64 * H + h) * CHUNKS + c)
            # within the chunk: dCB, and each step k's gradient: the decays exp(s_i - s_j) that
            # span it (j < k <= i), each row's partial sums over j, never a difference of totals
            decay = tl.exp(tl.where(causal, s[:, None] - s[None, :], -float("inf")))
            cb = tl.dot(Cc, tl.trans(Bc))  # each head again: fewer registers held over the heads
            dyx_decay = tl.dot(dyc, tl.trans(xc)) * decay
            dcb = dyx_decay * dt_s[None, :]
            z = dcb * cb
            spans = tl.cumsum(z, axis=1) - z  # [i, k]: sum_{j < k} z_ij
            within = tl.sum(tl.where(causal, spans, 0.0), axis=0)
            dC_sum += tl.dot(dcb.to(Bc.dtype), Bc)
            dB_sum += tl.dot(tl.trans(dcb).to(Cc.dtype), Cc)
            dA_step = within + from_in + from_out
            if dx is None:
                tl.store(ddA + at, dA_step)
            else:  # x's, dt's (before the softplus), D's, A's and dt_bias's gradients
                m = cb * decay * dt_s[None, :]
                dxc = tl.dot(tl.trans(m.to(dyc.dtype)), dyc)
                dxc += tl.dot(Bc, tl.trans(grad)) * w[:, None]
                part = (b64 * CHUNKS + c) * H + h  # [b, chunks, h]
                if D is not None:
                    dxc += tl.load(D + h).to(tl.float32) * dyc.to(tl.float32)
                    tl.store(dD_part + part, tl.sum(dyc.to(tl.float32) * xc.to(tl.float32)))
                dxo = b64 * stride_dx_b + t64[:, None] * stride_dx_l + h * stride_dx_h + p[None, :]
                tl.store(dx + dxo, dxc.to(dx.dtype.element_ty), rows)
                a = tl.load(A + h).to(tl.float32)
                dt_grad = tl.sum(dyx_decay * cb, axis=0) + decay_out * xgb + dA_step * a
                raw = tl.load(dt + b64 * stride_dt_b + t64 * stride_dt_l + h, t_ok, 0.0)
                raw = raw.to(tl.float32) + tl.load(dt_bias + h).to(tl.float32)
                dt_grad = tl.where(raw <= 20.0, dt_grad * tl.sigmoid(raw), dt_grad)  # softplus'
                dt_grad = tl.where(t_ok, dt_grad, 0.0)
                tl.store(ddt + b64 * stride_ddt_b + t64 * stride_ddt_l + h, dt_grad, t_ok)
                tl.store(dA_part + part, tl.sum(dA_step * dt_s))
                tl.store(dbias_part + part, tl.sum(dt_grad))
        dbc = b64 * stride_dbc_b + t64[:, None] * stride_dbc_l + g * stride_dbc_g + n[None, :]
        tl.store(dB + dbc, dB_sum.to(dB.dtype.element_ty), t_ok[:, None])
        tl.store(dC + dbc, dC_sum.to(dC.dtype.element_ty), t_ok[:, None])


def _check(x, dy, dA_sums, B, C, states, dstates, dB, dC, *more):
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    chunks, chunk_size = dA_sums.shape[2:]
    if any(t.stride(-1) != 1 for t in (x, dy, B, C, dB, dC, *more)):
        raise ValueError("x, dy, B, C and the gradients need adjacent channels")
    if C.stride() != B.stride() or dC.stride() != dB.stride():
        raise ValueError("C's strides must be B's and dC's dB's")
    if H % G or chunk_size & (chunk_size - 1) or N & (N - 1) or P & (P - 1):
        raise ValueError(
            f"heads {H} in {G} groups; chunk {chunk_size}, state {N}, head dim {P} powers of 2"
        )
    for name, t in (("states", states), ("dstates", dstates)):
        if t.shape != (b, chunks, H, P, N) or not t.is_contiguous():
            raise ValueError(f"{name} {tuple(t.shape)}: want contiguous {(b, chunks, H, P, N)}")


def _launch(x, dy, dt_soft, dA_sums, B, C, states, dstates, ddA_last, dB, dC, ddA, *inputs,
            dt_strides=(0, 0), ddt_strides=(0, 0)):  # fmt: skip
    # inputs: dt, A, dt_bias, D, dx, ddt, dA_part, dD_part, dbias_part (or Nones)
    b, L, H, _ = x.shape
    chunks, chunk_size = dA_sums.shape[2:]
    dx = inputs[4]
    _ssd_bc_grad_kernel[(chunks, B.size(2), b)](
        x, dy, dt_soft.contiguous(), dA_sums.contiguous(), B, C, states, dstates,
        ddA_last.contiguous(), dB, dC, ddA, *inputs, L,
        x.stride(0), x.stride(1), x.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
        B.stride(0), B.stride(1), B.stride(2), dB.stride(0), dB.stride(1), dB.stride(2),
        *(dx.stride()[:3] if dx is not None else (0, 0, 0)), *dt_strides, *ddt_strides,
        HEADS_PER_GROUP=H // B.size(2), P=x.size(3), N=B.size(3), Q=chunk_size,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip


def ssd_bc_grads(
    x: torch.Tensor,
    dy: torch.Tensor,
    dt_soft: torch.Tensor,
    dA_sums: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    states: torch.Tensor,
    dstates: torch.Tensor,
    ddA_last: torch.Tensor,
    dB: torch.Tensor,
    dC: torch.Tensor,
) -> torch.Tensor:
    """B's and C's gradients written into dB and dC (B's shape and strides) and dA's (each
    step's dt * A, [b, h, chunks, chunk] fp32) returned, from x and dy [b, l, h, p], dt after
    the softplus and dA's sums within each chunk [b, h, chunks, chunk] (fp32), B and C
    [b, l, g, n], the states passed into each chunk [b, chunks, h, p, n] (fp32), the gradients
    of those each passes on (same shape) and of each chunk's last dA sum through it
    [b, h, chunks] (ssd_state_grad_kernel.ssd_state_grads). Channels adjacent throughout."""
    _check(x, dy, dA_sums, B, C, states, dstates, dB, dC)
    ddA = torch.empty(dA_sums.shape, dtype=torch.float32, device=x.device)
    nothing = (None,) * 9
    _launch(x, dy, dt_soft, dA_sums, B, C, states, dstates, ddA_last, dB, dC, ddA, *nothing)
    return ddA


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
    """All of the SSD's gradients after ssd_bc_grads' inputs: x's, dt's (before
    softplus(dt + dt_bias); [b, l, h], its heads adjacent), B's and C's written into dx, ddt,
    dB and dC; (A's, D's or None, dt_bias's) [h] fp32 returned. kept: the forward's (dt after
    the softplus, dA's sums, the states passed into each chunk)."""
    dt_soft, dA_sums, states = kept
    _check(x, dy, dA_sums, B, C, states, dstates, dB, dC, dx)
    if dt.stride(-1) != 1 or ddt.stride(-1) != 1:
        raise ValueError("dt and ddt need adjacent heads")
    b, chunks, H = x.size(0), dA_sums.size(2), x.size(2)
    parts = [torch.empty(b, chunks, H, dtype=torch.float32, device=x.device) for _ in range(3)]
    dA_part, dD_part, dbias_part = parts
    _launch(
        x, dy, dt_soft, dA_sums, B, C, states, dstates, ddA_last, dB, dC, None,
        dt, A, dt_bias, D, dx, ddt, dA_part, dD_part if D is not None else None, dbias_part,
        dt_strides=dt.stride()[:2], ddt_strides=ddt.stride()[:2],
    )  # fmt: skip
    sums = [t.sum((0, 1)) for t in parts]
    return sums[0], sums[1] if D is not None else None, sums[2]
