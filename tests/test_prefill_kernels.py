"""The prefill's GPU kernels (causal-conv1d's conv with carried state, mamba-ssm's scan and gated
norm) against the torch reference. On CPUs: the glue around them (layouts, state updates,
arguments), with stand-ins that follow the kernels' documented contracts and check the layouts
the real ones insist on. On a GPU with the kernels: the real ones."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model_config
from toolkit.model import HybridLM, mamba2
from toolkit.model.kernels import (
    PrefillKernels,
    fused_mamba_available,
    prefill_kernels,
    ssd_mamba_ssm,
)
from toolkit.model.mamba2 import Mamba2Mixer, causal_conv
from toolkit.model.ssd import ssd_chunked

PIECES = [(0, 1), (1, 3), (3, 10), (10, 11), (11, 20)]  # shorter and longer than the width


class FakeConv:
    """causal_conv1d_fn's contract (cat the initial states, conv, SiLU), with the checks of its
    C++ entry point for what the prefill passes: channel-last x and initial states of width
    k - 1 in x's dtype. Its output is channel-last, as the real one's (empty_like(x))."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, weight, bias=None, initial_states=None, activation=None):
        self.calls += 1
        b, c, _ = x.shape
        k = weight.size(1)
        assert weight.shape == (c, k) and activation == "silu"
        assert x.stride(1) == 1 and x.stride(2) % 8 == 0 and c % 8 == 0
        if initial_states is not None:
            assert initial_states.shape == (b, c, k - 1) and initial_states.stride(1) == 1
            assert initial_states.dtype == x.dtype
            x = torch.cat([initial_states, x], dim=-1)
        else:
            x = F.pad(x, (k - 1, 0))
        out = F.silu(F.conv1d(x, weight.unsqueeze(1), bias, groups=c))
        return out.transpose(1, 2).contiguous().transpose(1, 2)


def fake_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf),
              return_final_states=False, return_varlen_states=False):  # fmt: skip
    """mamba_chunk_scan_combined's contract (softplus(dt + dt_bias) and the D skip inside)."""
    assert z is None and seq_idx is None and return_final_states and not return_varlen_states
    fake_scan.calls += 1
    dt = dt.float() + (0.0 if dt_bias is None else dt_bias.float())
    dt = F.softplus(dt) if dt_softplus else dt
    y, final_state = ssd_chunked(x, dt, A, B, C, chunk_size, initial_states)
    return y + x * D[:, None], final_state


def fake_gated_norm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """rmsnorm_fn's contract: group-wise RMSNorm of x * silu(z) (norm_before_gate=False), in
    fp32, rounded to x's dtype."""
    assert bias is None and not norm_before_gate and x.stride(-1) == 1 and z.stride(-1) == 1
    fake_gated_norm.calls += 1
    g = (x.float() * F.silu(z.float())).unflatten(-1, (-1, group_size))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.flatten(-2) * weight.float()).to(x.dtype)


def sequence(b: int = 2, length: int = 20, c: int = 24, wider: int = 40) -> torch.Tensor:
    """[b, length, c] as a slice of a wider activation (in_proj's output): channel-last."""
    return torch.randn(b, length, wider, dtype=torch.float64)[..., 8 : 8 + c]


@pytest.mark.parametrize("width", [2, 4])
def test_causal_conv_kernel_branch_equals_the_reference_across_pieces(width):
    """A sequence in pieces, each continuing from the conv state the last left: the kernel
    branch gives the reference's outputs and states bit for bit at every boundary (pieces
    shorter than the width included), and both equal the conv over the whole sequence."""
    xbc = sequence()
    c = xbc.size(-1)
    weight, bias = torch.randn(c, width, dtype=xbc.dtype), torch.randn(c, dtype=xbc.dtype)
    whole = causal_conv(xbc, weight, bias)
    conv = FakeConv()
    states = [torch.full((2, c, width), 7.0, dtype=xbc.dtype) for _ in range(2)]  # garbage
    for a, b in PIECES:
        ref = causal_conv(xbc[:, a:b], weight, bias, states[0], a > 0)
        got = causal_conv(xbc[:, a:b], weight, bias, states[1], a > 0, conv)
        assert torch.equal(got, ref) and torch.equal(states[1], states[0])
        assert got.is_contiguous()  # channel-last out: x, B and C need no transposing copy
        torch.testing.assert_close(got, whole[:, a:b], rtol=1e-12, atol=1e-12)
        padded = F.pad(xbc[:, :b].transpose(1, 2), (width, 0))
        assert torch.equal(states[1], padded[..., -width:])  # the last inputs, as decode keeps
    assert conv.calls == len(PIECES)


def test_causal_conv_takes_the_reference_where_the_kernel_cannot():
    """Channels not adjacent in memory (or not a multiple of 8): no kernel call, same numbers."""
    conv = FakeConv()
    weight = torch.randn(24, 4, dtype=torch.float64)
    channel_first = torch.randn(2, 24, 9, dtype=torch.float64).transpose(1, 2)
    odd = sequence(c=20)
    for xbc in (channel_first, odd):
        w = weight[: xbc.size(-1)]
        state = torch.zeros(2, xbc.size(-1), 4, dtype=xbc.dtype)
        want = causal_conv(xbc, w, None, state.clone(), True)
        assert torch.equal(causal_conv(xbc, w, None, state, True, conv), want)
    assert conv.calls == 0


def test_prefill_kernels_are_off_on_the_cpu():
    u = torch.zeros(1, 3, 64)
    for ssd in (ssd_chunked, ssd_mamba_ssm):
        mixer = Mamba2Mixer(64, d_state=16, head_dim=16, num_groups=2, ssd=ssd)
        assert prefill_kernels(mixer, u) == PrefillKernels()


def test_a_prefill_through_the_kernels_equals_the_torch_prefill(monkeypatch):
    """A hybrid's prompt in pieces through the kernel path (stand-ins for the kernels), then
    decode steps, equals the same through the torch code (and the full forward, whose scan
    chunks differ: fp32 inside): the conv state, the SSM state, dt before softplus, the D skip
    and the gated norm's groups reach the kernels as they should. Training (no states) keeps
    the torch code."""
    kernels = PrefillKernels(conv=FakeConv(), scan=fake_scan, gated_norm=fake_gated_norm)
    fake_scan.calls = fake_gated_norm.calls = 0
    # Widths the conv kernel takes: hidden 32 -> conv_dim 96, in_proj 168 rows (multiples of 8).
    model = HybridLM(tiny_model_config(), vocab_size=50).double().eval()
    tokens = torch.randint(0, 50, (2, 24))

    def prefill_and_decode() -> torch.Tensor:
        states = model.allocate_states(2, max_len=24)
        pieces = [model(tokens[:, a:b], states) for a, b in [(0, 2), (2, 11), (11, 12), (12, 20)]]
        return torch.cat(pieces + [model(tokens[:, t : t + 1], states) for t in range(20, 24)], 1)

    with torch.no_grad():
        want = prefill_and_decode()
        monkeypatch.setattr(mamba2, "prefill_kernels", lambda mixer, u: kernels)
        full = model(tokens)
        assert kernels.conv.calls == fake_scan.calls == 0
        got = prefill_and_decode()
    n_mamba = model.layout.pattern.count("M")  # the 1-token piece is a decode step
    assert kernels.conv.calls == fake_scan.calls == fake_gated_norm.calls == 3 * n_mamba
    # The reference scan computes in fp32, and x, B, C reach it in another memory layout (the
    # conv kernel's output is channel-last): fp32 rounding apart, the same numbers.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


def test_padded_passes_through_the_kernels_equal_the_torch_passes(monkeypatch):
    """Prompts admitted together run in passes whose rows are padded after their real positions
    (the engine's `valid`): through the kernels (stand-ins), each row's outputs at its real
    positions and every state (the conv's columns before the padding, the SSM state with dt
    zero on the padding, rows that are padding only keeping theirs) equal the torch code's."""
    kernels = PrefillKernels(conv=FakeConv(), scan=fake_scan, gated_norm=fake_gated_norm)
    fake_scan.calls = fake_gated_norm.calls = 0
    model = HybridLM(tiny_model_config(), vocab_size=50).double().eval()
    tokens = torch.randint(0, 50, (4, 24))
    passes = [(0, 16, [16, 9, 3, 0]), (16, 8, [8, 0, 0, 0])]  # start, piece, real per row

    def prefill() -> tuple[list[torch.Tensor], list]:
        states = model.allocate_states(4, max_len=24)
        outs = []
        for start, piece, real in passes:
            views = states.rows(4, start, torch.tensor(real))
            hidden = model.hidden(tokens[:, start : start + piece], views)
            outs += [hidden[row, :n] for row, n in enumerate(real)]
        return outs, [s for s in states if isinstance(s, mamba2.MambaState)]

    with torch.no_grad():
        want, want_states = prefill()
        monkeypatch.setattr(mamba2, "prefill_kernels", lambda mixer, u: kernels)
        got, got_states = prefill()
    assert fake_scan.calls == 2 * len(want_states) and kernels.conv.calls == fake_scan.calls
    # The stand-in norm computes in fp32 (as the real one): fp32 rounding apart, equal.
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_states[0].conv, want_states[0].conv)  # before any fp32 rounding
    for g, w in zip(got_states, want_states, strict=True):
        torch.testing.assert_close(g.conv, w.conv, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.ssm, w.ssm, rtol=1e-6, atol=1e-6)
    assert not want_states[0].ssm[3].any()  # padding only: as fresh as it started


needs_kernels = pytest.mark.skipif(
    not fused_mamba_available(), reason="needs CUDA, mamba-ssm and causal-conv1d"
)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@needs_kernels
def test_prefill_kernels_equal_the_torch_prefill_on_gpu():
    """The real kernels (fp32; the scan's dots run in TF32) against the torch code on the same
    GPU, prompt pieces of 5, 128, 1 and 166 tokens over 2 rows continuing from their states."""
    torch.manual_seed(0)
    kw = dict(d_state=64, head_dim=32, num_groups=2, chunk_size=64)
    mixer = Mamba2Mixer(256, ssd=ssd_mamba_ssm, **kw).cuda()
    reference = Mamba2Mixer(256, **kw).cuda()
    reference.load_state_dict(mixer.state_dict())
    u = torch.randn(2, 300, 256, device="cuda")
    assert None not in prefill_kernels(mixer, u)
    states = [mixer.allocate_state(2, torch.device("cuda"), torch.float32) for _ in range(2)]
    with torch.no_grad():
        for a, b in [(0, 5), (5, 133), (133, 134), (134, 300)]:
            got, want = mixer(u[:, a:b], states[0]), reference(u[:, a:b], states[1])
            assert rel_l2(got, want) < 5e-3, (a, b, rel_l2(got, want))
            assert torch.equal(states[0].conv, states[1].conv)
            assert rel_l2(states[0].ssm, states[1].ssm) < 5e-3
            assert states[0].seen == states[1].seen == b


@needs_kernels
def test_bf16_prefill_in_pieces_on_gpu_matches_the_cpu_reference():
    """What the engine runs: a bf16 hybrid with model.kernels='auto' on the GPU, a prompt in
    pieces through the states, then decode steps, against the fp32 CPU reference's full
    forward."""
    torch.manual_seed(0)
    kw = dict(
        hidden_size=256,
        num_attention_heads=4,
        ffn_hidden_size=512,
        mamba_state_dim=64,
        mamba_head_dim=32,
        mamba_num_groups=2,
        mamba_chunk_size=64,
        seq_length=512,
    )
    cpu = HybridLM(tiny_model_config(kernels="reference", **kw), vocab_size=500).eval()
    gpu = HybridLM(tiny_model_config(kernels="auto", **kw), vocab_size=500)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda().bfloat16().eval()
    mixer = next(b.mixer for b in gpu.layers if b.kind == "M")
    assert None not in prefill_kernels(mixer, torch.zeros(1, device="cuda"))
    tokens = torch.randint(0, 500, (2, 400))
    with torch.no_grad():
        want = cpu(tokens)
        states = gpu.allocate_states(2, max_len=400)
        t = tokens.cuda()
        pieces = [gpu(t[:, a:b], states) for a, b in [(0, 128), (128, 300), (300, 395)]]
        steps = [gpu(t[:, i : i + 1], states) for i in range(395, 400)]
    assert rel_l2(torch.cat(pieces + steps, 1).float(), want) < 3e-2
