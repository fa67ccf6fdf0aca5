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
in mamba-ssm's stable order (no difference of cumulative sums). Given dx it also makes x's, dt's
(but through dA) and D's gradients, which mamba-ssm's backward makes in one more kernel from C Bt
made again. The op takes it only where TOOLKIT_TRITON_MAMBA names "bc" or "dx" (with x's): it
waits for its check and timing on a GPU (tests/test_ssd_bc_grad_kernel.py,
benchmarks/gpu_kernels.py --backward).

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

if triton_imports():
    import triton
    import triton.language as tl

    @triton.jit
    def _ssd_bc_grad_kernel(x, dy, dt_soft, dA_sums, B, C, states, dstates, ddA_last, dB, dC,
                            ddA, D, dx, ddt, dD, L, stride_x_b, stride_x_l, stride_x_h,
                            stride_dy_b, stride_dy_l, stride_dy_h, stride_bc_b, stride_bc_l,
                            stride_bc_g, stride_dbc_b, stride_dbc_l, stride_dbc_g, stride_dx_b,
                            stride_dx_l, stride_dx_h, HEADS_PER_GROUP: tl.constexpr,
                            P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr):  # fmt: skip
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
        bc = b64 * stride_bc_b + t64[:, None] * stride_bc_l + g * stride_bc_g + n[None, :]
        Bc = tl.load(B + bc, t_ok[:, None], 0.0)
        Cc = tl.load(C + bc, t_ok[:, None], 0.0)
        cb = tl.dot(Cc, tl.trans(Bc))
        dB_sum = tl.zeros([Q, N], dtype=tl.float32)
        dC_sum = tl.zeros([Q, N], dtype=tl.float32)
        for k in range(HEADS_PER_GROUP):
            h = g * HEADS_PER_GROUP + k
            at = ((b64 * H + h) * CHUNKS + c) * Q + i  # [b, h, chunks, Q]
            s = tl.load(dA_sums + at)
            dt_s = tl.load(dt_soft + at)
            last = tl.sum(tl.where(i == Q - 1, s, 0.0), axis=0)
            rows = t_ok[:, None] & (p[None, :] < P)
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
            # through the state passed on: w_j x_j G, and (with dA_last's gradient through S)
            # each step's from it: sum_{j < k} of s_j's
            w = tl.exp(last - s) * dt_s
            xg = tl.dot(xc, grad)
            dB_sum += xg * w[:, None]
            out_j = w * tl.sum(xg * Bc.to(tl.float32), axis=1)
            from_out = tl.cumsum(out_j, axis=0) - out_j
            from_out += tl.load(ddA_last + (b64 * H + h) * CHUNKS + c)
            # within the chunk: dCB, and each step k's gradient: the decays exp(s_i - s_j) that
            # span it (j < k <= i), each row's partial sums over j, never a difference of totals
            decay = tl.exp(tl.where(causal, s[:, None] - s[None, :], -float("inf")))
            dyx_decay = tl.dot(dyc, tl.trans(xc)) * decay
            dcb = dyx_decay * dt_s[None, :]
            z = dcb * cb
            if dx is not None:  # x's gradient, dt's (but through dA) and D's
                m = cb * decay * dt_s[None, :]
                dxc = tl.dot(tl.trans(m.to(dyc.dtype)), dyc)
                dxc += tl.dot(Bc, tl.trans(grad)) * w[:, None]
                d = 0.0
                if D is not None:
                    d = tl.load(D + h).to(tl.float32)
                    tl.store(dD + (b64 * CHUNKS + c) * H + h, tl.sum(dyc.to(tl.float32) * xc.to(tl.float32)))  # fmt: skip
                dxc += d * dyc.to(tl.float32)
                dxo = b64 * stride_dx_b + t64[:, None] * stride_dx_l + h * stride_dx_h + p[None, :]
                tl.store(dx + dxo, dxc.to(dx.dtype.element_ty), rows)
                ddt_in = tl.sum(dyx_decay * cb, axis=0)
                ddt_out = tl.exp(last - s) * tl.sum(xg * Bc.to(tl.float32), axis=1)
                tl.store(ddt + at, ddt_in + ddt_out)
            spans = tl.cumsum(z, axis=1) - z  # [i, k]: sum_{j < k} z_ij
            within = tl.sum(tl.where(causal, spans, 0.0), axis=0)
            dC_sum += tl.dot(dcb.to(Bc.dtype), Bc)
            dB_sum += tl.dot(tl.trans(dcb).to(Cc.dtype), Cc)
            # through the state passed in, each step k's: sum_{i >= k} of s_i's
            from_in = tl.sum(ds) - tl.cumsum(ds, axis=0) + ds
            tl.store(ddA + at, within + from_in + from_out)
        dbc = b64 * stride_dbc_b + t64[:, None] * stride_dbc_l + g * stride_dbc_g + n[None, :]
        tl.store(dB + dbc, dB_sum.to(dB.dtype.element_ty), t_ok[:, None])
        tl.store(dC + dbc, dC_sum.to(dC.dtype.element_ty), t_ok[:, None])


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
    D: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """B's and C's gradients written into dB and dC (B's shape and strides) and dA's (each
    step's dt * A, [b, h, chunks, chunk] fp32) returned, from x and dy [b, l, h, p], dt after
    the softplus and dA's sums within each chunk [b, h, chunks, chunk] (fp32), B and C
    [b, l, g, n], the states passed into each chunk [b, chunks, h, p, n] (fp32), the gradients
    of those each passes on (same shape) and of each chunk's last dA sum through it
    [b, h, chunks] (ssd_state_grad_kernel.ssd_state_grads). Channels adjacent throughout.
    Given dx (x's shape), also x's gradient (with D's skip [h], if given) written into it, and
    returned (dA's, dt's through all but dA [b, h, chunks, chunk] fp32, D's [h] fp32 or None);
    without, (dA's, None, None)."""
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    chunks, chunk_size = dA_sums.shape[2:]
    if any(t.stride(-1) != 1 for t in (x, dy, B, C, dB, dC, *([dx] if dx is not None else []))):
        raise ValueError("x, dy, B, C, dB, dC and dx need adjacent channels")
    if C.stride() != B.stride() or dC.stride() != dB.stride():
        raise ValueError("C's strides must be B's and dC's dB's")
    if H % G or chunk_size & (chunk_size - 1) or N & (N - 1) or P & (P - 1):
        raise ValueError(
            f"heads {H} in {G} groups; chunk {chunk_size}, state {N}, head dim {P} powers of 2"
        )
    for name, t in (("states", states), ("dstates", dstates)):
        if t.shape != (b, chunks, H, P, N) or not t.is_contiguous():
            raise ValueError(f"{name} {tuple(t.shape)}: want contiguous {(b, chunks, H, P, N)}")
    dt_soft, dA_sums, ddA_last = dt_soft.contiguous(), dA_sums.contiguous(), ddA_last.contiguous()
    fp32 = dict(dtype=torch.float32, device=x.device)
    ddA = torch.empty(dA_sums.shape, **fp32)
    ddt = torch.empty(dA_sums.shape, **fp32) if dx is not None else None
    dD = torch.empty(b, chunks, H, **fp32) if dx is not None and D is not None else None
    dx_strides = dx.stride()[:3] if dx is not None else (0, 0, 0)
    _ssd_bc_grad_kernel[(chunks, G, b)](
        x, dy, dt_soft, dA_sums, B, C, states, dstates, ddA_last, dB, dC, ddA,
        D if dx is not None else None, dx, ddt, dD, L,
        x.stride(0), x.stride(1), x.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
        B.stride(0), B.stride(1), B.stride(2), dB.stride(0), dB.stride(1), dB.stride(2),
        *dx_strides, HEADS_PER_GROUP=H // G, P=P, N=N, Q=chunk_size, num_warps=NUM_WARPS,
    )  # fmt: skip
    return ddA, ddt, dD.sum((0, 1)) if dD is not None else None
