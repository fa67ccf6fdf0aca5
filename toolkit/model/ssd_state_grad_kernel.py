"""The gradients of the Mamba-2 SSD's chunk states as one Triton kernel that carries each head's
state gradient back through the chunks in registers, for our fused training op's backward
(fused_mamba.ssd_backward_from_states).

mamba-ssm's backward makes them in 2 kernels that pass them through memory in fp32: the
gradient of the state entering each chunk from that chunk's outputs, C^T (dy * exp(dA's sums)),
written, then read back and summed in reverse (state passing), 0.50 of the SSD backward's
2.3 ms a layer at the 800M's widths on an H100 (RESULTS.md 2026-12-06 afternoon). Here a
program walks one sequence's chunks backwards for one head and a block of its channels and
writes what mamba-ssm's later backward kernels read: the gradient of the state each chunk passes
on (x's dtype), the gradient of each chunk's last dA sum through the state it passes on (fp32)
and the kept states in x's dtype. The rounding follows mamba-ssm's kernels: dy * exp(dA) in the
inputs' dtype into the product, sums in fp32. On an H100 1.43x mamba-ssm's two kernels at the
800M's widths, 1.24x at the 8B's (RESULTS.md 2026-12-06 evening): the op takes it by default
(TOOLKIT_TRITON_MAMBA's "dstates"; tests/test_ssd_state_grad_kernel.py,
benchmarks/gpu_kernels.py --state-grads).
"""

import torch

from toolkit.model.kernels import triton_imports

# A program carries a BLOCK_P x BLOCK_N block of a head's state gradient in fp32 (the blocks are
# independent: more programs for a walk that is one chunk after another).
BLOCK_P = 64
BLOCK_N = 64
BLOCK_Q = 128  # a chunk's steps a product (as timed on the H100; 32 spills less: to time)
NUM_WARPS = 4

if triton_imports():
    import triton
    import triton.language as tl

    @triton.jit
    def _ssd_state_grad_kernel(dy, C, dA_sums, states, dstates, ddA_last, states_out, L, CHUNKS,
                               stride_dy_b, stride_dy_l, stride_dy_h, stride_c_b, stride_c_l,
                               stride_c_g, HEADS_PER_GROUP: tl.constexpr, P: tl.constexpr,
                               N: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):  # fmt: skip
        pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pid_p, pid_n = pid // (N // BLOCK_N), pid % (N // BLOCK_N)
        H = tl.num_programs(1)
        g = h // HEADS_PER_GROUP
        cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        col_ok = cols < P
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        q = tl.arange(0, BLOCK_Q)
        b64 = b.to(tl.int64)
        grad = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)  # of the state c passes on
        for k in range(CHUNKS):
            c = CHUNKS - 1 - k
            da_at = ((b64 * H + h) * CHUNKS + c) * Q  # [b, h, chunks, Q]
            last = tl.load(dA_sums + da_at + Q - 1)
            # [b, chunks, h, P, N]: the state passed into chunk c, and the gradient of the one
            # it passes on
            at = (((b64 * CHUNKS + c) * H + h) * P + cols[:, None]) * N + n[None, :]
            state = tl.load(states + at, col_ok[:, None], 0.0)
            tl.store(dstates + at, grad.to(dstates.dtype.element_ty), col_ok[:, None])
            if states_out is not None:
                tl.store(states_out + at, state.to(states_out.dtype.element_ty), col_ok[:, None])
            # dA_last's gradient through the state passed on: exp(dA_last) sum(state * grad)
            tl.atomic_add(  # in fp32 from the kept states, fp32 or rounded to x's dtype
                ddA_last + (b64 * H + h) * CHUNKS + c,
                tl.exp(last) * tl.sum(state.to(tl.float32) * grad),
            )
            # the state passed into chunk c, read by its outputs: (dy * exp(dA))^T C over the
            # chunk's steps, BLOCK_Q at a time
            inflow = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
            for q0 in range(0, Q, BLOCK_Q):
                t = c * Q + q0 + q
                t_ok = t < L
                t64 = t.to(tl.int64)
                dA = tl.load(dA_sums + da_at + q0 + q)
                dyo = b64 * stride_dy_b + t64[:, None] * stride_dy_l + h * stride_dy_h + cols[None, :]  # fmt: skip
                dyc = tl.load(dy + dyo, t_ok[:, None] & col_ok[None, :], 0.0)
                scaled = (dyc.to(tl.float32) * tl.exp(dA)[:, None]).to(dyc.dtype)
                co = b64 * stride_c_b + t64[:, None] * stride_c_l + g * stride_c_g + n[None, :]
                Cc = tl.load(C + co, t_ok[:, None], 0.0).to(dyc.dtype)
                inflow += tl.dot(tl.trans(scaled), Cc)
            grad = grad * tl.exp(last) + inflow  # and passed on decayed


def ssd_state_grads(
    dy: torch.Tensor,
    C: torch.Tensor,
    dA_sums: torch.Tensor,
    states: torch.Tensor,
    lowp_states: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """From dy [b, l, h, p] (adjacent channels), C [b, l, g, n] (adjacent state), dA's sums
    within each chunk [b, h, chunks, chunk] and the states passed into each chunk
    [b, chunks, h, p, n] (fp32 or dy's dtype, contiguous): (the gradient of the state each
    chunk passes on [b, chunks, h, p, n] in dy's dtype, that of each chunk's last dA sum through
    it [b, h, chunks] in fp32, the states in dy's dtype or None without `lowp_states`; those
    given where they are in dy's dtype already): mamba-ssm's _chunk_scan_bwd_dstates and
    _state_passing_bwd (without initial states) in one kernel."""
    b, L, H, P = dy.shape
    G, N = C.shape[2:]
    chunks, chunk_size = dA_sums.shape[2:]
    if dy.stride(3) != 1 or C.stride(3) != 1:
        raise ValueError("dy and C need adjacent channels")
    if H % G or chunk_size & (chunk_size - 1) or N & (N - 1):
        raise ValueError(f"heads {H} in {G} groups; chunk {chunk_size} and state {N} powers of 2")
    if states.shape != (b, chunks, H, P, N) or not states.is_contiguous():
        raise ValueError(f"states {tuple(states.shape)}: want contiguous {(b, chunks, H, P, N)}")
    dA_sums = dA_sums.contiguous()
    dstates = torch.empty(states.shape, dtype=dy.dtype, device=dy.device)
    copy = lowp_states and states.dtype != dy.dtype
    states_out = torch.empty(states.shape, dtype=dy.dtype, device=dy.device) if copy else None
    ddA_last = torch.zeros(b, H, chunks, dtype=torch.float32, device=dy.device)
    block_p, block_n = min(BLOCK_P, triton.next_power_of_2(P)), min(BLOCK_N, N)
    grid = (triton.cdiv(P, block_p) * (N // block_n), H, b)
    _ssd_state_grad_kernel[grid](
        dy, C, dA_sums, states, dstates, ddA_last, states_out, L, chunks,
        dy.stride(0), dy.stride(1), dy.stride(2), C.stride(0), C.stride(1), C.stride(2),
        HEADS_PER_GROUP=H // G, P=P, N=N, Q=chunk_size, BLOCK_P=block_p, BLOCK_N=block_n,
        BLOCK_Q=min(BLOCK_Q, chunk_size),
        num_warps=NUM_WARPS,
    )  # fmt: skip
    if lowp_states and not copy:  # the states are in dy's dtype already
        states_out = states
    return dstates, ddA_last, states_out
