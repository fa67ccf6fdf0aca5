"""The Mamba-2 SSD's forward for training as one Triton kernel that carries each head's state
through the chunks in registers, for our fused training op (fused_mamba.py).

mamba-ssm's forward runs 5 kernels that pass the chunk states through memory in fp32: the
chunk states written (chunk state), read and written (state passing) and read (scan). At the
800M's widths a chunk's states (32 heads x 64 x 128 x 4 bytes) are twice its x, and the SSD
ran at a tenth of the HBM's bandwidth by its own bytes (RESULTS.md 2026-12-06 afternoon). Here
a program walks one sequence's chunks for one head and a block of its channels: dt's softplus
and dA's sums within the chunk, C Bt, the chunk's output from its own inputs and from the state
passed in, then the state passed on. It writes y, and what mamba-ssm's backward kernels read
(fused_mamba.ssd_backward_from_states): dt after the softplus, dA's sums and the state passed
into each chunk in fp32. The rounding follows mamba-ssm's kernels: the products' operands in
the inputs' dtype, sums in fp32. Right on an H100 but 0.83x mamba-ssm's kernels at the 800M's
widths, 0.88x at the 8B's (RESULTS.md 2026-12-06 evening: one program walks all of a sequence's
chunks, latency-bound, and its 128 x 128 fp32 tiles spilled 1.5 KB a thread; it now takes a
chunk's rows BLOCK_M at a time, outputs and state: 0.4 KB compiled for sm_90 here, not yet
re-timed), so the op takes it only where TOOLKIT_TRITON_MAMBA names "forward"
(tests/test_ssd_scan_kernel.py, benchmarks/gpu_kernels.py --fused-forward,
benchmarks/kernel_resources.py).
"""

import torch

from toolkit.model.kernels import triton_imports

BLOCK_P = 64  # a head's channels a program carries (its state: BLOCK_P x state in fp32)
BLOCK_M = 32  # the chunk's output rows a step (its 128 x 128 fp32 tiles spilled: 1.5 KB a thread)
NUM_WARPS = 8

if triton_imports():
    import triton
    import triton.language as tl

    @triton.jit
    def _softplus(x):
        return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))

    @triton.jit
    def _chunk_start(dt, dt_out, dA_out, states, state, write_dt, b64, h, c, i, cols, col_ok, L,
                     bias, a, stride_dt_b, stride_dt_l, H, CHUNKS, P: tl.constexpr,
                     N: tl.constexpr, Q: tl.constexpr):  # fmt: skip
        """Chunk c's steps (in range, 64-bit), dt after the softplus, dA's sums and the last of
        them: the first two written (where write_dt) as mamba-ssm's cumsum kernel writes them
        [b, h, chunks, Q], with the state passed into the chunk [b, chunks, h, P, N] (rounded
        to the states' dtype; the one carried on stays fp32)."""
        t = c * Q + i
        t_ok = t < L
        t64 = t.to(tl.int64)
        raw = tl.load(dt + b64 * stride_dt_b + t64 * stride_dt_l + h, t_ok, 0.0).to(tl.float32)
        dt_s = tl.where(t_ok, _softplus(raw + bias), 0.0)
        dA = tl.cumsum(dt_s * a, axis=0)
        at = ((b64 * H + h) * CHUNKS + c) * Q + i
        if write_dt:
            tl.store(dt_out + at, dt_s)
            tl.store(dA_out + at, dA)
        base = (((b64 * CHUNKS + c) * H + h) * P) * N
        n = tl.arange(0, N)
        tl.store(states + base + cols[:, None] * N + n[None, :],
                 state.to(states.dtype.element_ty), col_ok[:, None])  # fmt: skip
        return t_ok, t64, dt_s, dA, tl.sum(tl.where(i == Q - 1, dA, 0.0), axis=0)

    @triton.jit
    def _ssd_forward_kernel(x, dt, dt_bias, A, B, C, D, y, dt_out, dA_out, states, L, CHUNKS,
                            stride_x_b, stride_x_l, stride_x_h, stride_dt_b, stride_dt_l,
                            stride_bc_b, stride_bc_l, stride_bc_g, stride_y_b, stride_y_l,
                            stride_y_h, HEADS_PER_GROUP: tl.constexpr, P: tl.constexpr,
                            N: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_M: tl.constexpr):  # fmt: skip
        pid_p, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        H = tl.num_programs(1)
        g = h // HEADS_PER_GROUP
        cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        col_ok = cols < P
        n = tl.arange(0, N)
        i = tl.arange(0, Q)
        bias, a, d = tl.load(dt_bias + h).to(tl.float32), tl.load(A + h).to(tl.float32), 0.0
        if D is not None:
            d = tl.load(D + h).to(tl.float32)
        b64 = b.to(tl.int64)
        state = tl.zeros([BLOCK_P, N], dtype=tl.float32)
        for c in range(CHUNKS):
            t_ok, t64, dt_s, dA, last = _chunk_start(
                dt, dt_out, dA_out, states, state, pid_p == 0, b64, h, c, i, cols, col_ok, L,
                bias, a, stride_dt_b, stride_dt_l, H, CHUNKS, P, N, Q,
            )  # fmt: skip
            bc = b64 * stride_bc_b + t64[:, None] * stride_bc_l + g * stride_bc_g + n[None, :]
            Bc = tl.load(B + bc, t_ok[:, None], 0.0)
            xo = b64 * stride_x_b + t64[:, None] * stride_x_l + h * stride_x_h + cols[None, :]
            ok = t_ok[:, None] & col_ok[None, :]
            xc = tl.load(x + xo, ok, 0.0)
            state_in = state.to(xc.dtype)
            inflow = tl.zeros([BLOCK_P, N], dtype=tl.float32)  # the chunk's own to the state
            for i0 in range(0, Q, BLOCK_M):  # the chunk's rows, BLOCK_M at a time
                r = i0 + tl.arange(0, BLOCK_M)
                tr = c * Q + r
                r_ok = tr < L
                tr64 = tr.to(tl.int64)
                # dA's sums at these rows, from the steps' dA in registers (no slice of dA)
                below = r[:, None] >= i[None, :]
                dA_r = tl.sum(tl.where(below, (dt_s * a)[None, :], 0.0), axis=1)
                cr = b64 * stride_bc_b + tr64[:, None] * stride_bc_l + g * stride_bc_g + n[None, :]
                Cr = tl.load(C + cr, r_ok[:, None], 0.0)
                # within the chunk: (C Bt * exp(dA_i - dA_j) * dt_j, causal) x
                cb = tl.dot(Cr, tl.trans(Bc))
                decay = tl.exp(tl.where(below, dA_r[:, None] - dA[None, :], -float("inf")))
                m = cb * decay * dt_s[None, :]
                out = tl.dot(m.to(xc.dtype), xc)
                # from the state passed in: C h * exp(dA_i)
                out += tl.dot(Cr, tl.trans(state_in)) * tl.exp(dA_r)[:, None]
                rows = r_ok[:, None] & col_ok[None, :]
                xr_at = b64 * stride_x_b + tr64[:, None] * stride_x_l + h * stride_x_h + cols[None, :]  # fmt: skip
                xr = tl.load(x + xr_at, rows, 0.0)
                out += d * xr.to(tl.float32)
                yo = b64 * stride_y_b + tr64[:, None] * stride_y_l + h * stride_y_h + cols[None, :]
                tl.store(y + yo, out.to(y.dtype.element_ty), rows)
                # these rows into the state passed on: xt (B * exp(dA_last - dA_j) * dt_j)
                raw_r = tl.load(dt + b64 * stride_dt_b + tr64 * stride_dt_l + h, r_ok, 0.0)
                dt_r = tl.where(r_ok, _softplus(raw_r.to(tl.float32) + bias), 0.0)
                Br = tl.load(B + cr, r_ok[:, None], 0.0)
                scaled = (Br.to(tl.float32) * (tl.exp(last - dA_r) * dt_r)[:, None]).to(xr.dtype)
                inflow += tl.dot(tl.trans(xr), scaled)
            state = state * tl.exp(last) + inflow  # the state passed on


def ssd_forward_fused(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor,
    states_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """fused_mamba.ssd_forward_keeping_states's contract in one kernel: y [b, l, h, p]
    (contiguous, x's dtype, with D's skip) of x [b, l, h, p], dt [b, l, h] before
    softplus(dt + dt_bias), A [h], B and C [b, l, g, n] (the channels of each adjacent), and
    (dt after the softplus, dA's sums within each chunk [b, h, chunks, chunk], the state
    passed into each chunk [b, chunks, h, p, n]) in fp32, the states in `states_dtype` (y from
    the fp32 ones all the same)."""
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    if x.stride(3) != 1 or B.stride(3) != 1 or C.stride() != B.stride() or dt.stride(2) != 1:
        raise ValueError("x, B, C and dt need adjacent channels, B's strides C's")
    if H % G or chunk_size & (chunk_size - 1) or N & (N - 1):
        raise ValueError(f"heads {H} in {G} groups; chunk {chunk_size} and state {N} powers of 2")
    chunks = triton.cdiv(L, chunk_size)
    fp32 = dict(dtype=torch.float32, device=x.device)
    y = torch.empty(b, L, H, P, dtype=x.dtype, device=x.device)
    dt_out = torch.empty(b, H, chunks, chunk_size, **fp32)
    dA_out = torch.empty(b, H, chunks, chunk_size, **fp32)
    states = torch.empty(b, chunks, H, P, N, dtype=states_dtype, device=x.device)
    block_p = min(BLOCK_P, triton.next_power_of_2(P))
    grid = (triton.cdiv(P, block_p), H, b)
    _ssd_forward_kernel[grid](
        x, dt, dt_bias, A, B, C, D, y, dt_out, dA_out, states, L, chunks,
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1), y.stride(2),
        HEADS_PER_GROUP=H // G, P=P, N=N, Q=chunk_size, BLOCK_P=block_p,
        BLOCK_M=min(BLOCK_M, chunk_size), num_warps=NUM_WARPS,
    )  # fmt: skip
    return y, (dt_out, dA_out, states)
