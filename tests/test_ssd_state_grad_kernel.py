"""The SSD's chunk-state gradients in one kernel (toolkit/model/ssd_state_grad_kernel.py)
against autograd through the states' recurrence: under Triton's interpreter on a CPU (in a
subprocess: TRITON_INTERPRET must be set before Triton compiles anything), compiled on a GPU,
and there against mamba-ssm's two kernels it replaces."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from tests.test_ssd_scan_kernel import mixer_ssd_inputs
from tests.test_step_graph import in_subprocess, interpret

CUDA = torch.cuda.is_available()
ROOT = pathlib.Path(__file__).resolve().parents[1]

# The reference: chunk c passes on exp(last_c) * (the state passed in) + X_c, and its outputs
# read the state passed in as exp(dA) * C S^T; the loss is sum(y * dy). Its gradients: X_c's is
# the gradient of the state chunk c passes on, last_c's (dA's last sum, taken as a leaf of its
# own) that of dA_last through it. A length that ends in a partial chunk (dy and C zero past
# it), a chunk's steps in two products, heads in groups of 2, one and two blocks of a head's
# channels and of its state, fp32 and bf16 (bf16 on a GPU only: the interpreter's tl.dot of
# bf16 tiles is wrong).
CASES = """
import sys
import torch
from tests.kernel_cases import for_device
import toolkit.model.ssd_state_grad_kernel as sk

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
cases = for_device([
    (torch.float32, 1e-4, 37, 16, 16, 32),
    (torch.float32, 1e-4, 64, 32, 16, 16),
    (torch.bfloat16, 2e-2, 37, 32, 16, 16),
], device)
for dtype, tol, L, P, block_p, block_n in cases:
    sk.BLOCK_P, sk.BLOCK_N, sk.BLOCK_Q = block_p, block_n, 16  # chunks of 32: two steps
    b, H, G, N, Q = 2, 4, 2, 32, 32
    chunks = -(-L // Q)
    row = torch.randn(b, L, H * P + 2 * G * N, device=device).to(dtype)
    dy = row[..., : H * P].unflatten(-1, (H, P))  # views of wider rows, as the op's are
    C = row[..., H * P + G * N :].unflatten(-1, (G, N))
    dA = torch.cumsum(-torch.rand(b, H, chunks, Q, device=device) * 0.3, -1)
    X = torch.randn(b, chunks, H, P, N, device=device, requires_grad=True)
    last = dA[..., -1].clone().requires_grad_()
    pad = chunks * Q - L
    dyc = torch.nn.functional.pad(dy.float(), (0, 0, 0, 0, 0, pad)).unflatten(1, (chunks, Q))
    Cc = torch.nn.functional.pad(C.float(), (0, 0, 0, 0, 0, pad)).unflatten(1, (chunks, Q))
    Cc = Cc.repeat_interleave(H // G, dim=3)  # [b, chunks, Q, H, N]
    state, states, loss = torch.zeros(b, H, P, N, device=device), [], 0.0
    for c in range(chunks):
        states.append(state)
        y = torch.einsum("bqhn,bhpn->bqhp", Cc[:, c], state) * dA[:, :, c].exp().mT[..., None]
        loss = loss + (y * dyc[:, c]).sum()
        state = state * last[:, :, c].exp()[..., None, None] + X[:, c]
    want_dstates, want_ddA = torch.autograd.grad(loss, (X, last))
    states = torch.stack(states, 1).detach().contiguous()
    dstates, ddA_last, states_out = sk.ssd_state_grads(dy, C, dA, states)

    def close(name, got, ref):
        err = (got.float() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= tol * max(scale, 1.0), (name, dtype, L, P, err, scale)

    assert dstates.dtype == states_out.dtype == dtype and ddA_last.dtype == torch.float32
    close("dstates", dstates, want_dstates)
    close("ddA_last", ddA_last, want_ddA)
    close("states", states_out, states)
    # states kept in dy's dtype (fused_mamba.LOWP_STATES under bf16) are given back as they are;
    # kept in bf16, dA_last's gradient is that of their fp32 values, the rest as before
    same = states.to(dtype)
    assert sk.ssd_state_grads(dy, C, dA, same)[2] is same
    low = states.to(torch.bfloat16)
    from_low, from_rounded = (sk.ssd_state_grads(dy, C, dA, t) for t in (low, low.float()))
    for got, ref in zip(from_low, from_rounded):
        close("from bf16 states", got, ref.float())
print("state grad kernel agrees")
"""


def test_state_grad_kernel_is_autograd_under_the_interpreter():
    interpret(CASES, "state grad kernel agrees", timeout=300)


def test_state_grad_kernel_refuses_what_it_cannot_read():
    pytest.importorskip("triton")
    from toolkit.model.ssd_state_grad_kernel import ssd_state_grads

    dy, C = torch.randn(1, 32, 4, 16), torch.randn(1, 32, 2, 16)
    dA, states = torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 4, 16, 16)
    with pytest.raises(ValueError, match="states"):
        ssd_state_grads(dy, C, dA, states.transpose(3, 4))
    with pytest.raises(ValueError, match="adjacent channels"):
        ssd_state_grads(dy.transpose(2, 3).contiguous().transpose(2, 3), C, dA, states)


def test_the_op_takes_this_kernel_by_default_and_names_are_checked():
    """TOOLKIT_TRITON_MAMBA: unset, the kernels of ours that were faster on a GPU (the chunk
    states and their gradients, B's, C's and dt's, the gated norm); 'none', none of ours; a name
    it does not know, or one without the kernels it reads, stops the import, naming it."""
    pytest.importorskip("triton")
    code = "import toolkit.model.fused_mamba as fm; print(sorted(fm.TRITON_MAMBA))"
    env = {k: v for k, v in os.environ.items() if k != "TOOLKIT_TRITON_MAMBA"}

    def names(value):  # the import under that setting, started (the five run side by side)
        return subprocess.Popen(
            [sys.executable, "-c", code],
            env=env if value is None else {**env, "TOOLKIT_TRITON_MAMBA": value},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip

    unset, none, two, bad, alone = map(names, (None, "none", "norm,dx", "dstates,fast", "dt"))
    want = "['bc', 'dstates', 'dt', 'norm', 'states']"
    assert unset.communicate(timeout=120)[0].strip() == want
    assert none.communicate(timeout=120)[0].strip() == "[]"
    assert two.communicate(timeout=120)[0].strip() == "['dx', 'norm']"
    stderr = bad.communicate(timeout=120)[1]
    assert bad.returncode != 0 and "TOOLKIT_TRITON_MAMBA: 'dstates,fast'" in stderr
    stderr = alone.communicate(timeout=120)[1]  # the dt kernel reads the B/C kernels' rows
    assert alone.returncode != 0 and "'dt' reads our B/C kernels' dA rows" in stderr


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_compiled_state_grad_kernel_is_autograd_on_the_gpu():
    in_subprocess(CASES, "state grad kernel agrees", "cuda", timeout=300)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_state_grad_kernel_matches_mamba_ssms_on_the_gpu():
    """At the 800M's mixer widths (bf16, states from mamba-ssm's forward kernels): the three
    outputs against _chunk_scan_bwd_dstates then _state_passing_bwd, as
    fused_mamba.ssd_state_grads_by_mamba_ssm calls them, within bf16 roundings."""
    pytest.importorskip("mamba_ssm")
    from toolkit.model.fused_mamba import ssd_forward_keeping_states, ssd_state_grads_by_mamba_ssm
    from toolkit.model.ssd_state_grad_kernel import ssd_state_grads

    x, dt, A, B, C, D, dt_bias = mixer_ssd_inputs()
    _, (_, dA_sums, states) = ssd_forward_keeping_states(x, dt, A, B, C, 128, D, dt_bias)
    dy = torch.randn_like(x)
    ours = ssd_state_grads(dy, C, dA_sums, states)
    theirs = ssd_state_grads_by_mamba_ssm(dy, C, dA_sums, states)
    for name, a, t in zip(("dstates", "ddA_last", "states"), ours, theirs):
        assert a.dtype == t.dtype and a.shape == t.shape, (name, a.dtype, t.dtype)
        err = ((a.float() - t.float()).norm() / t.float().norm()).item()
        assert err <= 1e-2, (name, err)


def test_kernel_resources_compiles_for_hopper_without_a_gpu():
    """benchmarks/kernel_resources.py: the kernel compiled for sm_90 here, its registers, spills
    and shared memory read from the cubin (how its tiles were sized on a CPU)."""
    triton = pytest.importorskip("triton")
    tools = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin"
    if not (tools / "cuobjdump").exists():
        pytest.skip("Triton without its CUDA tools")
    out = subprocess.run(
        [sys.executable, "benchmarks/kernel_resources.py", "--only", "state_grads", "--warps", "4"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip()
    assert re.fullmatch(
        r"state_grads \(p64_n64\)\s+w4 s1: +\d+ registers, +\d+ stack bytes, +\d+ shared bytes",
        line,
    ), line
