"""The SSD's gradients within each chunk in two kernels (toolkit/model/ssd_chunk_grad_kernel.py),
fed by the chunk-state gradients' kernel (ssd_state_grad_kernel.py), against autograd through
the SSD's quadratic form: under Triton's interpreter on a CPU (in a subprocess), compiled on a
GPU, and there against mamba-ssm's kernels they replace."""

import pytest
import torch

from tests.test_ssd_scan_kernel import mixer_ssd_inputs
from tests.test_step_graph import in_subprocess, interpret

CUDA = torch.cuda.is_available()

# The reference: y_t = sum_{s <= t} (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s x_s (+ D x_t) over
# the whole sequence, dt = softplus(dt + dt_bias) and a = dt * A; the loss sum(y * dy). The
# kernels get what the forward keeps (the states passed into each chunk, dA's sums within it,
# chunked as the reference chunked scan's prefixes end), and their gradients of x, dt (before
# the softplus), B, C, dt_bias, A and D must be autograd's. Chunks of one and two blocks of
# rows (BC_BLOCK_M) and of one to four (BLOCK_M), a length that ends in a partial chunk, a
# dt_bias on softplus's linear side, D and none, heads in groups of 2 and 4, B, C, x and dy
# views of wider rows, fp32 (bf16 on a GPU only: the interpreter's tl.dot of bf16 tiles is
# wrong). B's and C's kernels alone give dA's gradient through the states (autograd's less
# that through the pairs within one chunk) and with `within` all of it.
CASES = """
import sys
import torch
from tests.kernel_cases import for_device
import torch.nn.functional as F
from toolkit.model.ssd import ssd_chunked
import toolkit.model.ssd_chunk_grad_kernel as ck
from toolkit.model.ssd_state_grad_kernel import ssd_state_grads

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
cases = for_device([
    (torch.float32, 1e-4, 37, 4, 2, True, 16),
    (torch.float32, 1e-4, 48, 8, 2, False, 32),
    (torch.float32, 1e-4, 100, 4, 2, True, 64),
    (torch.bfloat16, 3e-2, 37, 8, 2, True, 16),
], device)
for dtype, tol, L, H, G, with_d, Q in cases:
    b, P, N = 2, 16, 16
    ck.BLOCK_M = ck.BC_BLOCK_M = 16
    ck.DT_BLOCK_H = 8  # the dt kernel's: 4 heads half a block (masked), 8 one
    chunks = -(-L // Q)
    row = torch.randn(b, L, 2 * H * P + 2 * G * N + H + 8, device=device).to(dtype)
    x = row[..., : H * P].unflatten(-1, (H, P))
    dy = row[..., H * P : 2 * H * P].unflatten(-1, (H, P))
    B = row[..., 2 * H * P : 2 * H * P + G * N].unflatten(-1, (G, N))
    C = row[..., 2 * H * P + G * N : 2 * H * P + 2 * G * N].unflatten(-1, (G, N))
    dt = row[..., 2 * H * P + 2 * G * N : 2 * H * P + 2 * G * N + H]  # before the softplus
    dt_bias = torch.randn(H, device=device) * 0.5 - 1
    dt_bias[0] = 25.0  # softplus's linear side (mamba-ssm's threshold: 20)
    A = -torch.rand(H, device=device) - 0.5
    D = torch.randn(H, device=device) if with_d else None
    leaves = [t.float().requires_grad_() for t in (x, B, C, dt, dt_bias, A)]
    xl, Bl, Cl, dtl, biasl, Al = leaves
    if with_d:
        leaves.append(D.clone().requires_grad_())
    soft = torch.where(dtl + biasl > 20, dtl + biasl, F.softplus(dtl + biasl))
    a = soft * Al  # each step's dA
    Bh, Ch = (t.repeat_interleave(H // G, dim=2) for t in (Bl, Cl))
    cum = torch.cumsum(a, 1)  # [b, l, h]
    span = cum[:, :, None] - cum[:, None, :]  # [b, t, s, h]
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, :, :, None]
    decay = torch.where(causal, span, -torch.inf).exp()
    y = torch.einsum("bthn,bshn,btsh,bsh,bshp->bthp", Ch, Bh, decay, soft, xl)
    if with_d:
        y = y + xl * leaves[-1][:, None]
    *want, want_a = torch.autograd.grad((y * dy.float()).sum(), [*leaves, a])
    # dA's gradient within the chunks alone (mamba-ssm's ddAcs kernel's part in the "bc" path)
    a_in = a.detach().requires_grad_()
    cum = torch.cumsum(a_in, 1)
    chunk_of = torch.arange(L, device=device) // Q
    same = chunk_of[:, None] == chunk_of
    within = torch.where(causal & same[None, :, :, None], cum[:, :, None] - cum[:, None, :],
                         -torch.inf).exp()
    y_in = torch.einsum("bthn,bshn,btsh,bsh,bshp->bthp", Ch, Bh, within, soft, xl)
    (want_within,) = torch.autograd.grad((y_in * dy.float()).sum(), [a_in])
    # dt's gradient after the softplus by the path that is not dA's (dt_j x_j's)
    soft_in = soft.detach().requires_grad_()
    y_dt = torch.einsum("bthn,bshn,btsh,bsh,bshp->bthp", Ch, Bh, decay.detach(), soft_in, xl)
    (want_direct,) = torch.autograd.grad((y_dt * dy.float()).sum(), [soft_in])
    # what the forward keeps: dt after the softplus and dA's sums [b, h, chunks, Q], the states
    soft = soft.detach()
    pad = chunks * Q - L

    def by_chunk(t):  # [b, l, h] -> [b, h, chunks, Q], zeros past the end
        return F.pad(t, (0, 0, 0, pad)).unflatten(1, (chunks, Q)).permute(0, 3, 1, 2).contiguous()

    dt_soft = by_chunk(soft)
    dA_sums = torch.cumsum(dt_soft * A[:, None, None], -1)
    states = torch.zeros(b, chunks, H, P, N, device=device)
    for c in range(1, chunks):
        _, states[:, c] = ssd_chunked(x[:, : c * Q].float(), soft[:, : c * Q], A,
                                      B[:, : c * Q].float(), C[:, : c * Q].float(), Q)
    dstates, ddA_last, lowp = ssd_state_grads(dy, C, dA_sums, states, lowp_states=False)
    assert lowp is None  # as the op asks: the kernels below read the fp32 states

    def close(name, got, ref):
        err = (got.float() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= tol * max(scale, 1.0), (name, dtype, L, H, err, scale)

    def nans(t):
        return torch.full_like(t, float("nan"))

    dx, dB, dC, ddt = nans(x), nans(B), nans(C), nans(row)[..., 5 : 5 + H]  # ddt: a view
    kept = (dt_soft, dA_sums, states)
    dA, dD, ddt_bias = ck.ssd_input_grads(x, dy, dt, A, dt_bias, D, kept, B, C, dstates, ddA_last,
                                          dx, ddt, dB, dC)
    for name, got, ref in zip(("dx", "dB", "dC", "ddt", "ddt_bias", "dA", "dD"),
                              (dx, dB, dC, ddt, ddt_bias, dA, dD), want):
        close(name, got, ref)
    assert (dD is None) == (not with_d)
    # B's and C's kernels alone, with dA's gradient through the states (and within the chunks);
    # its rows summed into dt's, A's and dt_bias's gradients by the dt kernel, given dt's by the
    # other path and, where our kernels did not make it, dA's within the chunks
    for within, ref_a in ((False, want_a - want_within), (True, want_a)):
        dB, dC = nans(B), nans(C)
        rows = ck.ssd_bc_grads(x, dy, kept, B, C, dstates, dB, dC, ddA_last, within)
        ddA = ck.dA_grads(rows).permute(0, 2, 3, 1).flatten(1, 2)[:, :L]  # [b, l, h] as a
        for name, got, ref in (("dB", dB, want[1]), ("dC", dC, want[2]), ("dA", ddA, ref_a)):
            close(f"{name} (within {within})", got, ref)
        ddt = nans(row)[..., 5 : 5 + H]
        if not within:  # the within-chunk part as mamba-ssm's kernel gives it in the op
            rows = rows._replace(within=by_chunk(want_within))
        dA, ddt_bias = ck.ssd_dt_grads(rows, by_chunk(want_direct), dt_soft, dt, A, dt_bias, ddt)
        for name, got, ref in (("ddt", ddt, want[3]), ("ddt_bias", ddt_bias, want[4]),
                               ("dA", dA, want[5])):
            close(f"{name} (dt kernel, within {within})", got, ref)
    if L == 37:  # states kept in bf16 (fused_mamba.LOWP_STATES) read as their fp32 values
        low = states.to(torch.bfloat16)  # (the same bits under the interpreter; compiled, the
        got = []  # two kernels may sum in other orders)
        for kept_states in (low, low.float()):
            dB, dC = nans(B), nans(C)
            rows = ck.ssd_bc_grads(x, dy, (dt_soft, dA_sums, kept_states), B, C, dstates, dB, dC,
                                   ddA_last)
            got.append((dB, dC, *rows[:3]))
        for name, a, b in zip(("dB", "dC", "into_outputs", "onto_state", "last"), *got):
            assert device != "cpu" or torch.equal(a, b), name
            close(f"{name} from bf16 states", a, b.float())
print("chunk grad kernels agree")
"""


def test_chunk_grad_kernels_are_autograd_under_the_interpreter():
    interpret(CASES, "chunk grad kernels agree", timeout=300)


def test_chunk_grad_kernels_refuse_what_they_cannot_read():
    pytest.importorskip("triton")
    import toolkit.model.ssd_chunk_grad_kernel as ck
    from toolkit.model.ssd_chunk_grad_kernel import ssd_input_grads

    x, B, dt = torch.randn(1, 32, 4, 16), torch.randn(1, 32, 2, 16), torch.randn(1, 32, 4)
    h4, soft, states = torch.ones(4), torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 4, 16, 16)
    ddA_last = torch.zeros(1, 4, 2)

    def call(x=x, B=B, dstates=states, dB=B):
        kept = (soft, soft, states)
        ssd_input_grads(x, x, dt, h4, h4, None, kept, B, B, dstates, ddA_last, x, dt, dB, dB)

    with pytest.raises(ValueError, match="dstates"):
        call(dstates=states[:, :1])
    with pytest.raises(ValueError, match="adjacent channels"):
        call(dB=B.mT.contiguous().mT)
    with pytest.raises(ValueError, match="head dim 24"):
        call(x=torch.randn(1, 32, 4, 24))
    rows = ck.DARows(soft, soft, ddA_last, soft[..., :8])
    with pytest.raises(ValueError, match=r"\[b, h, chunks, chunk\] alike"):
        ck.ssd_dt_grads(rows, soft, soft, dt, h4, h4, dt)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_compiled_chunk_grad_kernels_are_autograd_on_the_gpu():
    in_subprocess(CASES, "chunk grad kernels agree", "cuda", timeout=300)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_chunk_grad_kernels_match_mamba_ssms_on_the_gpu(monkeypatch):
    """At the 800M's mixer widths (bf16, from mamba-ssm's forward kernels' kept tensors): dx,
    dt's, B's, C's, A's, D's and dt_bias's gradients of fused_mamba.ssd_backward_from_states
    with our kernels (after mamba-ssm's state gradients or ours; all, or B's and C's alone),
    and from states kept in bf16, against those with mamba-ssm's alone, within bf16 roundings."""
    pytest.importorskip("mamba_ssm")
    import toolkit.model.fused_mamba as fm

    x, dt, A, B, C, D, dt_bias = mixer_ssd_inputs()
    args = (x, dt, A, B, C, 128, D, dt_bias)
    _, kept = fm.ssd_forward_keeping_states(*args)
    dy = torch.randn_like(x)
    grads = []
    sets = [
        set(),
        {"dx"},
        {"dstates", "dx"},
        {"bc"},
        {"dstates", "bc"},
        {"dstates", "bc", "ddacs"},
        {"dstates", "bc", "dt"},
        {"dstates", "bc", "ddacs", "dt"},
    ]
    for names in map(frozenset, sets):
        monkeypatch.setattr(fm, "TRITON_MAMBA", names)
        out = [torch.empty_like(t) for t in (x, dt, B, C)]
        rest = fm.ssd_backward_from_states(dy, *args, kept, *out)
        grads.append([*out, *rest])
    # the states kept in bf16 (LOWP_STATES), by mamba-ssm's kernels and ours: the scan rounds
    # them so anyway (the same output but for its autotuner's choice of order)
    for names in map(frozenset, (set(), {"states"}, {"dstates", "bc", "dt", "states"})):
        monkeypatch.setattr(fm, "TRITON_MAMBA", names)
        ys = []
        for lowp in (False, True):
            monkeypatch.setattr(fm, "LOWP_STATES", lowp)
            y, kept_now = fm.ssd_forward_keeping_states(*args)
            ys.append(y.float())
        assert kept_now[2].dtype == torch.bfloat16, names
        assert ((ys[1] - ys[0]).norm() / ys[0].norm()).item() <= 4e-3, names
        out = [torch.empty_like(t) for t in (x, dt, B, C)]
        rest = fm.ssd_backward_from_states(dy, *args, kept_now, *out)
        grads.append([*out, *rest])
    for ours in grads[1:]:
        for name, a, t in zip(("dx", "ddt", "dB", "dC", "dA", "dD", "ddt_bias"), ours, grads[0]):
            err = ((a.float() - t.float()).norm() / t.float().norm()).item()
            assert err <= 1e-2, (name, err)
