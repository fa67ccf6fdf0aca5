"""The chunked SSD reference against the defining recurrence, in float64."""

import pytest
import torch

from toolkit.model.ssd import segment_sum, ssd_chunked, ssd_recurrent, ssd_step

CUDA = torch.cuda.is_available()


def random_inputs(b=2, length=37, heads=4, p=3, groups=2, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    x = torch.randn(b, length, heads, p, **kw)
    dt = torch.nn.functional.softplus(torch.randn(b, length, heads, **kw) - 1)
    A = -torch.rand(heads, **kw) * 3 - 0.1
    B = torch.randn(b, length, groups, n, **kw)
    C = torch.randn(b, length, groups, n, **kw)
    h0 = torch.randn(b, heads, p, n, **kw)
    return x, dt, A, B, C, h0


def test_segment_sum_matches_definition():
    x = torch.randn(6, dtype=torch.float64)
    s = segment_sum(x)
    for i in range(6):
        for j in range(6):
            expected = x[j + 1 : i + 1].sum() if j <= i else -torch.inf
            assert s[i, j] == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("length", [1, 16, 37])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_equals_recurrence(chunk, length, with_initial_state):
    x, dt, A, B, C, h0 = random_inputs(length=length)
    init = h0 if with_initial_state else None
    y_ref, h_ref = ssd_recurrent(x, dt, A, B, C, initial_state=init)
    y, h = ssd_chunked(x, dt, A, B, C, chunk, init)
    # fp32 inside the chunked scan: agreement to ~1e-5 relative is what fp32 allows.
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)


def test_decode_steps_equal_recurrence():
    """ssd_step, token by token from an initial state (as decoding runs it), gives the
    recurrence's outputs and final state; it computes in fp32, as the chunked scan does."""
    x, dt, A, B, C, h0 = random_inputs(length=9)
    y_ref, h_ref = ssd_recurrent(x, dt, A, B, C, initial_state=h0)
    state = h0.float()
    ys = [ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state) for t in range(9)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), h_ref, rtol=1e-4, atol=1e-4)


def test_chunked_gradients_equal_recurrence():
    inputs = [t.requires_grad_() for t in random_inputs(length=21)]
    x, dt, A, B, C, h0 = inputs
    y, h = ssd_chunked(x, dt, A, B, C, 8, h0)
    (y.double().square().sum() + h.double().sum()).backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    y_ref, h_ref = ssd_recurrent(x, dt, A, B, C, initial_state=h0)
    (y_ref.square().sum() + h_ref.sum()).backward()
    for got, t in zip(grads, inputs):
        torch.testing.assert_close(got, t.grad, rtol=1e-3, atol=1e-3)


def test_splitting_a_sequence_carries_the_state():
    x, dt, A, B, C, _ = random_inputs(length=30)
    y_full, h_full = ssd_chunked(x, dt, A, B, C, 8)
    y1, h1 = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8)
    y2, h2 = ssd_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, h1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, h_full, rtol=1e-5, atol=1e-5)


def test_kernel_selection_without_mamba_ssm():
    """Here (no CUDA, no mamba-ssm) 'auto' is the reference, an explicit 'mamba_ssm' is a clear
    error, and the mamba-ssm wrapper falls back to the reference for CPU tensors."""
    from toolkit.model.kernels import mamba_ssm_available, select_ssd, ssd_mamba_ssm

    assert not mamba_ssm_available()
    assert select_ssd("auto") is ssd_chunked
    with pytest.raises(ValueError, match="needs CUDA and the mamba-ssm package"):
        select_ssd("mamba_ssm")
    with pytest.raises(ValueError, match="is not one of"):
        select_ssd("flash")
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(1, 10, 4, 3, generator=g), torch.rand(1, 10, 4, generator=g)
    A, B, C = (
        -torch.rand(4, generator=g),
        torch.randn(1, 10, 2, 5, generator=g),
        torch.randn(1, 10, 2, 5, generator=g),
    )
    for got, want in zip(ssd_mamba_ssm(x, dt, A, B, C, 4), ssd_chunked(x, dt, A, B, C, 4)):
        assert torch.equal(got, want)


def test_fused_mamba_path_is_off_without_its_kernels():
    """The fused op needs CUDA, mamba-ssm and causal-conv1d: here no recipe turns it on, and a
    mixer told to use it still runs CPU tensors through the reference path, same numbers."""
    from toolkit.model.kernels import fused_mamba_available, fused_mamba_conv
    from toolkit.model.mamba2 import Mamba2Mixer

    assert not fused_mamba_available()
    assert all(fused_mamba_conv(k) is None for k in ("auto", "mamba_ssm", "reference"))
    torch.manual_seed(0)
    plain = Mamba2Mixer(32, d_state=8, head_dim=8, num_groups=2, chunk_size=4)
    fused = Mamba2Mixer(32, d_state=8, head_dim=8, num_groups=2, chunk_size=4, fused=True)
    fused.load_state_dict(plain.state_dict())
    u = torch.randn(2, 12, 32)
    assert torch.equal(fused(u), plain(u))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))],
)
def test_rms_norm_is_the_fp32_definition(device, dtype, weight_dtype):
    """RMSNorm runs F.rms_norm (fused on CUDA, without casts when input and weight share a
    dtype); its numbers must stay the fp32 definition, rounded once."""
    from toolkit.model.norms import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    norm = norm.to(device, weight_dtype)
    x = (torch.randn(3, 5, 96, generator=g) * 4).to(device, dtype)
    xf = x.float()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()
    got = norm(x)
    assert got.dtype == dtype
    # The CUDA kernel sums in another order: in bf16 a result may round the other way.
    tol = 2**-8 if device == "cuda" and dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=tol, atol=1e-6)


def test_norms_under_autocast_write_its_dtype_with_the_same_numbers(monkeypatch):
    """Under bf16 autocast each RMSNorm of the model (the blocks' and the final one) writes bf16,
    the cast its reader's first linear would make, so the loss and every gradient are the
    ones of the norms writing the fp32 residual stream's dtype (norms.AUTOCAST_OUTPUT False),
    bit for bit: the Mamba, attention and MLP mixers and the output layer."""
    import torch.nn.functional as F

    from tests.conftest import tiny_model_config
    from toolkit.model import HybridLM, norms

    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))

    def run(autocast_output: bool) -> tuple[torch.Tensor, dict, set]:
        monkeypatch.setattr(norms, "AUTOCAST_OUTPUT", autocast_output)
        torch.manual_seed(0)
        model = HybridLM(tiny_model_config(), vocab_size=100)
        dtypes = set()
        for module in model.modules():
            if isinstance(module, norms.RMSNorm):
                module.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters()}, dtypes

    loss, grads, dtypes = run(True)
    assert dtypes == {torch.bfloat16}
    want_loss, want_grads, want_dtypes = run(False)
    assert want_dtypes == {torch.float32}
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, want_grads[name]), name


@pytest.mark.skipif(not CUDA, reason="mamba-ssm's fused add + norm runs on CUDA only")
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_fused_add_norm_equals_add_then_norm_on_gpu(kind):
    """The engine's residual sum + next norm: mamba-ssm's kernel against the two torch steps."""
    from torch import nn

    from toolkit.model import norms

    assert norms._fused_add_norm() is not None
    torch.manual_seed(0)
    norm = norms.build_norm(kind, 512, 1e-5).cuda().bfloat16()
    with torch.no_grad():
        norm.weight.normal_()
        if isinstance(norm, nn.LayerNorm):
            norm.bias.normal_()
    x, residual = (torch.randn(3, 7, 512, device="cuda", dtype=torch.bfloat16) for _ in "ab")
    for res in (None, residual):
        with torch.no_grad():
            out, total = norms.add_norm(x, res, norm)
            want_total = x if res is None else res + x
            assert torch.equal(total, want_total)
            torch.testing.assert_close(out, norm(want_total), rtol=2**-7, atol=2**-7)


def test_a_sequence_shorter_than_a_chunk_runs_at_its_own_length():
    """A 16-position prefill piece with 64-position chunks: the quadratic within-chunk part runs
    over 16 x 16 positions, not over a chunk of padding (on CPUs that was most of the time of
    admitting 64 short prompts)."""
    x, dt, A, B, C, h0 = random_inputs(length=16)
    with torch.profiler.profile(record_shapes=True) as prof:
        ssd_chunked(x, dt, A, B, C, 64, h0)
    shapes = [s for e in prof.events() for s in e.input_shapes if s]
    assert shapes and not any(64 in s for s in shapes), [s for s in shapes if 64 in s][:3]
