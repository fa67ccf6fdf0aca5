"""The SSD's gradients of B, C and dA in one kernel (toolkit/model/ssd_bc_grad_kernel.py), fed
by the chunk-state gradients' kernel (ssd_state_grad_kernel.py), against autograd through the
SSD's quadratic form: under Triton's interpreter on a CPU (in a subprocess), compiled on a GPU,
and there against mamba-ssm's kernels it replaces."""

import pytest
import torch

from tests.test_ssd_scan_kernel import mixer_ssd_inputs
from tests.test_step_graph import in_subprocess, interpret

CUDA = torch.cuda.is_available()

# The reference: y_t = sum_{s <= t} (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s x_s over the whole
# sequence, each step's a (dt * A) a leaf of its own; the loss sum(y * dy). The kernels get
# what the forward keeps (the states passed into each chunk, dA's sums within it, chunked as
# the reference chunked scan's prefixes end), and their dB, dC and a's gradient must be
# autograd's, and with dx given x's, dt's (but through a) and D's. A length that ends in a
# partial chunk, heads in groups of 2 and 4, B, C, x and dy views of wider rows, fp32 (bf16 on a
# GPU only: the interpreter's tl.dot of bf16 tiles is wrong).
CASES = """
import sys
import torch
from toolkit.model.ssd import ssd_chunked
from toolkit.model.ssd_bc_grad_kernel import ssd_bc_grads
from toolkit.model.ssd_state_grad_kernel import ssd_state_grads

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
cases = [(torch.float32, 1e-4, 37, 4, 2), (torch.float32, 1e-4, 48, 8, 2),
         (torch.bfloat16, 3e-2, 37, 8, 2)]
if device == "cpu":
    cases = [case for case in cases if case[0] == torch.float32]
for dtype, tol, L, H, G in cases:
    b, P, N, Q = 2, 16, 16, 16
    chunks = -(-L // Q)
    row = torch.randn(b, L, 2 * H * P + 2 * G * N + 8, device=device).to(dtype)
    x = row[..., : H * P].unflatten(-1, (H, P))
    dy = row[..., H * P : 2 * H * P].unflatten(-1, (H, P))
    B = row[..., 2 * H * P : 2 * H * P + G * N].unflatten(-1, (G, N))
    C = row[..., 2 * H * P + G * N : 2 * H * P + 2 * G * N].unflatten(-1, (G, N))
    dt = torch.rand(b, L, H, device=device) * 0.5 + 0.05
    A = -torch.rand(H, device=device) - 0.5
    D = torch.randn(H, device=device)
    a = (dt * A).requires_grad_()
    xl, dtl, Dl = x.float().requires_grad_(), dt.clone().requires_grad_(), D.clone().requires_grad_()
    Bl, Cl = B.float().requires_grad_(), C.float().requires_grad_()
    Bh, Ch = (t.repeat_interleave(H // G, dim=2) for t in (Bl, Cl))
    cum = torch.cumsum(a, 1)  # [b, l, h]
    span = cum[:, :, None] - cum[:, None, :]  # [b, t, s, h]
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, :, :, None]
    decay = torch.where(causal, span, -torch.inf).exp()
    y = torch.einsum("bthn,bshn,btsh,bsh,bshp->bthp", Ch, Bh, decay, dtl, xl) + xl * Dl[:, None]
    leaves = (a, Bl, Cl, xl, dtl, Dl)
    da, want_dB, want_dC, want_dx, want_ddt, want_dD = torch.autograd.grad((y * dy.float()).sum(), leaves)
    # what the forward keeps: dt and dA's sums [b, h, chunks, Q], the states passed in
    pad = chunks * Q - L
    dt_soft = torch.nn.functional.pad(dt, (0, 0, 0, pad)).unflatten(1, (chunks, Q))
    dt_soft = dt_soft.permute(0, 3, 1, 2).contiguous()
    dA_sums = torch.cumsum(dt_soft * A[:, None, None], -1)
    states = torch.zeros(b, chunks, H, P, N, device=device)
    for c in range(1, chunks):
        _, states[:, c] = ssd_chunked(x[:, : c * Q].float(), dt[:, : c * Q], A,
                                      B[:, : c * Q].float(), C[:, : c * Q].float(), Q)
    dstates, ddA_last, lowp = ssd_state_grads(dy, C, dA_sums, states, lowp_states=False)
    assert lowp is None  # as the op asks: the kernel below reads the fp32 states
    args = (x, dy, dt_soft, dA_sums, B, C, states, dstates, ddA_last)

    def unchunk(t):  # [b, h, chunks, Q] -> [b, l, h]
        return t.permute(0, 2, 3, 1).flatten(1, 2)[:, :L]

    def close(name, got, ref):
        err = (got.float() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= tol * max(scale, 1.0), (name, dtype, L, H, err, scale)

    # B's, C's and dA's alone (mamba-ssm's kernel makes x's), then x's, dt's and D's too
    for with_dx in (False, True):
        dB, dC = torch.full_like(B, float("nan")), torch.full_like(C, float("nan"))
        dx = torch.full_like(x, float("nan")) if with_dx else None
        ddA, ddt, dD = ssd_bc_grads(*args, dB, dC, D=D, dx=dx)
        close("dB", dB, want_dB)
        close("dC", dC, want_dC)
        close("dA", unchunk(ddA), da)
        if with_dx:
            close("dx", dx, want_dx)
            close("ddt", unchunk(ddt), want_ddt)
            close("dD", dD, want_dD)
        else:
            assert ddt is None and dD is None
print("bc grad kernel agrees")
"""


def test_bc_grad_kernel_is_autograd_under_the_interpreter():
    interpret(CASES, "bc grad kernel agrees", timeout=300)


def test_bc_grad_kernel_refuses_what_it_cannot_read():
    pytest.importorskip("triton")
    from toolkit.model.ssd_bc_grad_kernel import ssd_bc_grads

    x, B = torch.randn(1, 32, 4, 16), torch.randn(1, 32, 2, 16)
    dt, states = torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 4, 16, 16)
    ddA_last = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="dstates"):
        ssd_bc_grads(x, x, dt, dt, B, B, states, states[:, :1], ddA_last, B, B)
    with pytest.raises(ValueError, match="adjacent channels"):
        ssd_bc_grads(x, x, dt, dt, B, B, states, states, ddA_last, B, B.mT.contiguous().mT)
    with pytest.raises(ValueError, match="head dim 24"):
        x = torch.randn(1, 32, 4, 24)
        ssd_bc_grads(x, x, dt, dt, B, B, states, states, ddA_last, B, B)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_compiled_bc_grad_kernel_is_autograd_on_the_gpu():
    in_subprocess(CASES, "bc grad kernel agrees", "cuda", timeout=300)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_bc_grad_kernel_matches_mamba_ssms_on_the_gpu(monkeypatch):
    """At the 800M's mixer widths (bf16, from mamba-ssm's forward kernels' kept tensors): dx,
    dt's, B's, C's, A's, D's and dt_bias's gradients of fused_mamba.ssd_backward_from_states
    with our two kernels (B's, C's and dA's; and x's too) against those with mamba-ssm's,
    within bf16 roundings."""
    pytest.importorskip("mamba_ssm")
    import toolkit.model.fused_mamba as fm

    x, dt, A, B, C, D, dt_bias = mixer_ssd_inputs()
    args = (x, dt, A, B, C, 128, D, dt_bias)
    _, kept = fm.ssd_forward_keeping_states(*args)
    dy = torch.randn_like(x)
    grads = []
    for names in (frozenset(), frozenset({"dstates", "bc"}), frozenset({"dstates", "dx"})):
        monkeypatch.setattr(fm, "TRITON_MAMBA", names)
        out = [torch.empty_like(t) for t in (x, dt, B, C)]
        rest = fm.ssd_backward_from_states(dy, *args, kept, *out)
        grads.append([*out, *rest])
    for ours in grads[1:]:
        for name, a, t in zip(("dx", "ddt", "dB", "dC", "dA", "dD", "ddt_bias"), ours, grads[0]):
            err = ((a.float() - t.float()).norm() / t.float().norm()).item()
            assert err <= 1e-2, (name, err)
