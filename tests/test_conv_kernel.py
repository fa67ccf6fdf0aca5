"""model.mamba_conv_backend = "triton": our causal conv kernels (toolkit/model/conv_kernel.py)
against the mixer's torch conv, and the fused training op around them (fused_mamba.py) against
the mixer's torch path. On a CPU the kernels run under Triton's interpreter in a subprocess
(TRITON_INTERPRET must be set before Triton compiles anything), and mamba-ssm's SSD and norm
kernels, which CPUs lack, are stood in for by torch functions with their contracts (outputs
written into the gradient views they are given); on a GPU against causal-conv1d and mamba-ssm's
own fused op."""

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import load_benchmark
from tests.test_step_graph import in_subprocess, interpret
from toolkit.config import RecipeError, load_recipe
from toolkit.model.kernels import fused_mamba_available

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

# The kernels against causal_conv (the mixer's torch conv, its CPU reference) and autograd's
# gradients of it: x a slice of a wider tensor (in_proj's row), lengths and channels that end in
# partial tiles, one and several backward programs a sequence and tiles a program, widths 4, 3
# and 2 (the backward pads them to 4 taps) at each, with and without a bias by turns (each
# width and each tiling sees both), fp32 and bf16 (the reference in fp32 from the same bf16
# values). The weight's and bias's gradients are sums over 2 x 100 rows. dx is written into a
# slice of a wider tensor, whose other columns stay.
KERNELS = """
import sys
import torch
import toolkit.model.conv_kernel as ck
from toolkit.model.mamba2 import causal_conv

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
tilings = ((512, 32, 16), (48, 16, 16), (32, 16, 8))
cases = [(torch.float32, 2e-5, k, (i + j) % 2 == 0, rows, 100, 300)
         for i, k in enumerate((4, 3, 2)) for j, rows in enumerate(tilings)]
cases += [(torch.bfloat16, 2e-2, 4, True, (48, 16, 16), 100, 300)]
# The ring of 3 tiles (one barrier a tile), at the ring's smallest tile.
cases += [(torch.float32, 2e-5, k, True, (48, 16, 4, 3), 100, 300) for k in (4, 2)]
# A sequence whose rows pass 2^31 elements (the offsets in 64 bits); its pages are touched at
# 16 channels a row only.
cases += [(torch.bfloat16, 2e-2, 4, True, (512, 32, 16), 2100, 2**20)]
# The kernels a row at a time (STREAM 1, and 2: the backward alone beside the tiled forward):
# several programs a sequence, one ending past it (with 4 runs of rows a program: a run partly
# and one wholly past it), and channels in blocks of 64 (the last partial); widths 4 and 2,
# fp32 and bf16.
cases += [(torch.float32, 2e-5, 4, True, (1, 8, 64, 4), 50, 300),
          (torch.bfloat16, 2e-2, 2, False, (1, 24, 64, 1), 60, 300),
          (torch.bfloat16, 2e-2, 4, True, (2, 16, 64, 2), 60, 300)]
for dtype, tol, k, bias, (rows, block, backward_block, *slots), L, width in cases:
    ck.STREAM = rows if rows in (1, 2) else 0  # else rows is ROWS_PER_PROGRAM
    if ck.STREAM:
        ck.STREAM_ROWS, ck.STREAM_CHANNELS, ck.STREAM_SEGMENTS = block, backward_block, slots[0]
    else:
        ck.ROWS_PER_PROGRAM, ck.BLOCK_ROWS, ck.BACKWARD_BLOCK_ROWS = rows, block, backward_block
        ck.RING_SLOTS = slots[0] if slots else 2
    b, C = (2, 136) if width < 2**20 else (1, 16)
    x = torch.empty(b, L, width, dtype=dtype, device=device)[:, :, 37:37 + C]
    x.copy_(torch.randn(b, L, C))
    w = torch.randn(C, k, device=device)
    bb = torch.randn(C, device=device) if bias else None
    dout = torch.randn(b, L, C, device=device).to(dtype)
    xr = x.float().requires_grad_()
    wr = w.clone().requires_grad_()
    br = bb.clone().requires_grad_() if bias else None
    ref = causal_conv(xr, wr, br)
    ref.backward(dout.float())
    out = ck.conv_silu_forward(x, w, bb)
    assert out.dtype == dtype and out.is_contiguous()
    wide = torch.full((b, L, 300), 7.0, dtype=dtype, device=device)
    if width == 2**20:
        wide = x.as_strided((b, L, 300), x.stride(), x.storage_offset() + C)
        wide.fill_(7.0)
    dx, dw, db = ck.conv_silu_backward(x, w, bb, dout, dx=wide[:, :, 37:37 + C])
    assert dx.data_ptr() == wide[:, :, 37:].data_ptr()
    assert (wide[:, :, :37] == 7).all() and (wide[:, :, 37 + C:] == 7).all()
    def close(got, want, name):
        err = (got.float() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= tol * max(scale, 1.0), (name, dtype, bias, rows, err, scale)
    close(out, ref.detach(), "out")
    close(dx, xr.grad, "dx")
    close(dw, wr.grad, "dweight")
    if bias:
        close(db, br.grad, "dbias")
    else:
        assert db is None
print("conv kernels agree")
"""

# The fused op (our conv kernels, torch stand-ins for mamba-ssm's SSD and norm kernels with their
# contracts) against the same mixer's torch path: the output and every parameter's gradient.
FUSED = """
import sys, types
import torch
import torch.nn.functional as F
from toolkit.model.ssd import ssd_chunked


def ssd(x, dt, A, B, C, chunk_size, D, dt_bias):
    dt = F.softplus(dt.float() + dt_bias)
    y, _ = ssd_chunked(x, dt, A, B, C, chunk_size)
    return y + x * D[:, None]


def scan_fwd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False):
    assert z is None and dt_softplus
    return ssd(x, dt, A, B, C, chunk_size, D, dt_bias), None, None, None, None, None


def scan_bwd(dout, x, dt, A, B, C, out, chunk_size, D=None, dt_bias=None, dt_softplus=False,
             dx=None, ddt=None, dB=None, dC=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]
    with torch.enable_grad():  # a backward runs without it
        grads = torch.autograd.grad(ssd(*leaves[:5], chunk_size, *leaves[5:]), leaves, dout)
    for given, g in zip((dx, ddt, dB, dC), (grads[0], grads[1], grads[3], grads[4])):
        given.copy_(g)  # mamba-ssm's writes into the views it is given
    return dx, ddt, grads[2], dB, dC, grads[5], None, grads[6], None


def norm(y, weight, z, group_size, eps):
    g = y * F.silu(z)
    g = g.unflatten(-1, (-1, group_size))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return g.flatten(-2) * weight


def norm_fwd(x, weight, bias, eps, z=None, group_size=None, norm_before_gate=True,
             is_rms_norm=False):
    assert bias is None and not norm_before_gate and is_rms_norm
    return norm(x, weight, z, group_size, eps), None, torch.zeros(1)


def norm_bwd(dy, x, weight, bias, eps, mean, rstd, z=None, group_size=None,
             norm_before_gate=True, is_rms_norm=False, dz=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, z)]
    with torch.enable_grad():
        dx, dw, dz_ = torch.autograd.grad(norm(*leaves, group_size, eps), leaves, dy)
    dz.copy_(dz_)
    return dx, dw, None, dz


# causal-conv1d's channel-last functions (model.mamba_conv_backend "causal_conv1d"), by the
# mixer's torch conv: x, dout and dx [b, c, l] views with adjacent channels, dx written into.
from toolkit.model.mamba2 import causal_conv

CONV_CALLS = []


def channel_last_conv(x, weight, bias):
    return causal_conv(x.transpose(1, 2), weight, bias).transpose(1, 2)


def cc_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation):
    assert x.stride(1) == 1 and silu_activation and seq_idx is None and initial_states is None
    CONV_CALLS.append("forward")
    out = torch.empty_like(x)  # channel-last, dense: a contiguous [b, l, c] transposed
    assert out.transpose(1, 2).is_contiguous()
    return out.copy_(channel_last_conv(x, weight, bias))


def cc_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
           return_dinitial_states, silu_activation):
    assert x.stride(1) == dout.stride(1) == dx.stride(1) == 1 and silu_activation
    CONV_CALLS.append("backward")
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    with torch.enable_grad():
        grads = torch.autograd.grad(channel_last_conv(*leaves), leaves, dout)
    dx.copy_(grads[0])
    return dx, grads[1].float(), grads[2].float(), None


for name, attrs in (
    ("mamba_ssm", {}), ("mamba_ssm.ops", {}), ("mamba_ssm.ops.triton", {}),
    ("mamba_ssm.ops.triton.ssd_combined", {"_mamba_chunk_scan_combined_fwd": scan_fwd,
                                            "_mamba_chunk_scan_combined_bwd": scan_bwd}),
    ("mamba_ssm.ops.triton.layernorm_gated", {"_layer_norm_fwd": norm_fwd,
                                              "_layer_norm_bwd": norm_bwd}),
    ("causal_conv1d", {}),
    ("causal_conv1d.cpp_functions", {"causal_conv1d_fwd_function": cc_fwd,
                                     "causal_conv1d_bwd_function": cc_bwd}),
):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module

import toolkit.model.fused_mamba as fm
from toolkit.model.mamba2 import Mamba2Mixer

# The SSD without recompute (model.mamba_recompute = false): what the forward keeps must reach
# the backward, and neither the conv nor the combined scan may run again.
KEPT = []


def forward_keeping(x, dt, A, B, C, chunk_size, D, dt_bias, keep_cb=False):
    CONV_CALLS.append("ssd forward")
    KEPT.append(tuple(torch.randn(3) for _ in range(4 if keep_cb else 3)))  # C Bt the fourth
    return ssd(x, dt, A, B, C, chunk_size, D, dt_bias), KEPT[-1]


# With TOOLKIT_TRITON_MAMBA naming all of the SSD backward's kernels of ours ("dstates", "dx"),
# the op's own backward from the kept states runs them: no mamba-ssm kernel stood in.
OURS_BACKWARD = {"dstates", "dx"} <= fm.TRITON_MAMBA
backward_by_our_kernels = fm.ssd_backward_from_states


def backward_from(dy, x, dt, A, B, C, chunk_size, D, dt_bias, kept, dx, ddt, dB, dC):
    assert [t.data_ptr() for t in kept] == [t.data_ptr() for t in KEPT[-1]]
    CONV_CALLS.append("ssd backward")
    if OURS_BACKWARD:
        return backward_by_our_kernels(dy, x, dt, A, B, C, chunk_size, D, dt_bias, kept, dx,
                                       ddt, dB, dC)
    got = scan_bwd(dy, x, dt, A, B, C, None, chunk_size, D=D, dt_bias=dt_bias,
                   dt_softplus=True, dx=dx, ddt=ddt, dB=dB, dC=dC)
    return got[2], got[5], got[7]


def counted(function, name):
    return lambda *a, **k: CONV_CALLS.append(name) or function(*a, **k)


fm.ssd_forward_keeping_states, fm.ssd_backward_from_states = forward_keeping, backward_from
fm.conv_silu_forward = counted(fm.conv_silu_forward, "forward")
fm.conv_silu_backward = counted(fm.conv_silu_backward, "backward")
ssd_combined = sys.modules["mamba_ssm.ops.triton.ssd_combined"]
ssd_combined._mamba_chunk_scan_combined_fwd = counted(scan_fwd, "scan forward")
ssd_combined._mamba_chunk_scan_combined_bwd = counted(scan_bwd, "scan backward")

# With TOOLKIT_TRITON_MAMBA our norm kernels run in the op, and our SSD forward kernel itself
# where the states are kept (counted, its kept tensors handed to the backward), at tl.dot's
# smallest sizes (16).
if "forward" in fm.TRITON_MAMBA:
    ssd_forward_kernel = fm.ssd_forward_fused

    def forward_by_our_kernel(*args):
        CONV_CALLS.append("ssd forward")
        y, kept = ssd_forward_kernel(*args)
        KEPT.append(kept)
        return y, kept

    fm.ssd_forward_fused = forward_by_our_kernel

EXPECTED = {
    True: ["forward", "scan forward", "forward", "scan backward", "backward"],
    False: ["forward", "ssd forward", "ssd backward", "backward"],
}
# head_dim 16: in_proj's rows 164 wide (196 at state 16), not a multiple of 8 (causal-conv1d's
# views copied).
CASES = [("triton", True, 8), ("triton", False, 8), ("causal_conv1d", False, 8),
         ("causal_conv1d", False, 16)]
SIZES = dict(d_state=8, chunk_size=8)
if fm.TRITON_MAMBA - {"dstates"}:  # (the default's kernel is stood in for here)
    CASES, SIZES = [(b, r, 16) for b, r, _ in CASES[:3]], dict(d_state=16, chunk_size=16)
for backend, recompute, head_dim in CASES:
    torch.manual_seed(0)
    mixer = Mamba2Mixer(32, head_dim=head_dim, num_groups=2, conv_backend=backend,
                        recompute=recompute, **SIZES)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))  # the norm's ones, D's and the bias off their inits
    u = torch.randn(2, 37, 32)
    dout = torch.randn(2, 37, 32)
    results = []
    for path in (mixer._forward_fused, mixer.forward):
        CONV_CALLS.clear()
        mixer.zero_grad()
        out = path(u)
        out.backward(dout)
        results.append((out.detach(), {n: p.grad.clone() for n, p in mixer.named_parameters()}))
        if path == mixer._forward_fused:
            assert CONV_CALLS == EXPECTED[recompute], (backend, recompute, CONV_CALLS)
            # C Bt kept too where mamba-ssm's scan made it and its backward kernels read it
            if not recompute and fm.KEEP_CB and not {"forward", "dx"} & fm.TRITON_MAMBA:
                assert len(KEPT[-1]) == 4, len(KEPT[-1])
    (fused, fused_grads), (ref, ref_grads) = results
    case = (backend, recompute, head_dim)
    assert (fused - ref).abs().max() <= 1e-5 * ref.abs().max(), (case, (fused - ref).abs().max())
    assert fused_grads.keys() == ref_grads.keys() and len(ref_grads) == 8
    for n, g in ref_grads.items():
        err = (fused_grads[n] - g).abs().max().item()
        assert err <= 1e-4 * max(g.abs().max().item(), 1e-3), (case, n, err)
print("fused op agrees")
"""


def test_conv_kernels_are_the_torch_conv_under_the_interpreter():
    interpret(KERNELS, "conv kernels agree", timeout=300)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_compiled_conv_kernels_are_the_torch_conv_on_the_gpu():
    """The same cases compiled, with the ring's barriers between the threads of a program."""
    in_subprocess(KERNELS, "conv kernels agree", "cuda", timeout=300)


def test_fused_op_is_the_mixers_torch_path_under_the_interpreter():
    """Forward within 1e-5 and all 8 parameters' gradients within 1e-4 of the largest: the
    views of in_proj's output and gradient, z's and dt's gradients written in place, the conv's
    gradient written into in_proj's, and the order of the returned gradients; with our conv
    and with causal-conv1d's (stood in), recomputing or keeping the conv's output and the
    SSD's states (model.mamba_recompute), each pass run as often as the choice says."""
    interpret(FUSED, "fused op agrees", timeout=300)  # on a GPU: against mamba-ssm's own op


def test_fused_op_with_all_our_kernels_under_the_interpreter():
    """The same with TOOLKIT_TRITON_MAMBA=norm,forward,dstates,dx: our gated norm kernels and,
    where the states are kept, our SSD forward and backward kernels in the op (no mamba-ssm
    kernel then), fp32 (gated_norm_kernel.py, ssd_scan_kernel.py, ssd_state_grad_kernel.py and
    ssd_chunk_grad_kernel.py have their own tests)."""
    interpret(FUSED, "fused op agrees", timeout=300, TOOLKIT_TRITON_MAMBA="norm,forward,dstates,dx")


def test_the_stream_kernels_refuse_settings_they_cannot_run(monkeypatch):
    pytest.importorskip("triton")
    import toolkit.model.conv_kernel as ck

    x, w = torch.randn(1, 16, 8), torch.randn(8, 4)
    monkeypatch.setattr(ck, "STREAM", 1)
    for name, value in (("STREAM_SEGMENTS", 3), ("STREAM_CHANNELS", 96)):
        with monkeypatch.context() as m:
            m.setattr(ck, name, value)
            with pytest.raises(ValueError, match=f"{name} must be a power of 2, got {value}"):
                ck.conv_silu_forward(x, w, None)
            with pytest.raises(ValueError, match=name):
                ck.conv_silu_backward(x, w, None, torch.randn_like(x))


def test_stream_2_runs_the_backward_alone_a_row_at_a_time(monkeypatch):
    """STREAM=2: the tiled forward (as fast as causal-conv1d's) and the stream backward; 1 both
    a row at a time, 0 neither; any other value refused by name. The launches are recorded,
    not run (the cases above check each kernel's numbers)."""
    pytest.importorskip("triton")
    import toolkit.model.conv_kernel as ck

    launched = []

    class Launch(Exception):
        pass

    def recorder(name):
        def launch(*args, **kwargs):
            launched.append(name)
            raise Launch

        return type(name, (), {"__getitem__": lambda self, grid: launch})()

    for name in ("fwd", "fwd_stream", "bwd", "bwd_stream"):
        monkeypatch.setattr(ck, f"_conv_silu_{name}_kernel", recorder(name))
    x, w = torch.randn(1, 16, 64), torch.randn(64, 4)
    for stream, want in ((0, ["fwd", "bwd"]), (1, ["fwd_stream", "bwd_stream"]),
                         (2, ["fwd", "bwd_stream"])):  # fmt: skip
        monkeypatch.setattr(ck, "STREAM", stream)
        launched.clear()
        with pytest.raises(Launch):
            ck.conv_silu_forward(x, w, None)
        with pytest.raises(Launch):
            ck.conv_silu_backward(x, w, None, torch.randn_like(x))
        assert launched == want, stream
    monkeypatch.setattr(ck, "STREAM", 3)
    with pytest.raises(ValueError, match="STREAM must be 0, 1 or 2, got 3"):
        ck.conv_silu_forward(x, w, None)


def test_tiles_are_set_by_tokens_and_the_environment():
    """TOOLKIT_CONV_TILES sets the globals in a process (as a sweep's best is run in whole
    steps); a token it cannot read is refused by name, at import for the variable."""
    pytest.importorskip("triton")
    from toolkit.model.conv_kernel import tile_values

    assert tile_values("t2_h512_w8") == {"STREAM": 2, "STREAM_CHANNELS": 512, "NUM_WARPS": 8}
    with pytest.raises(ValueError, match="'f16' is not one of"):
        tile_values("t2_f16")
    show = "import toolkit.model.conv_kernel as ck; print(ck.STREAM, ck.STREAM_CHANNELS, 'ok')"
    in_subprocess(show, "2 1024 ok", TOOLKIT_CONV_TILES="t2_h1024")
    with pytest.raises(AssertionError, match="TOOLKIT_CONV_TILES: conv tiles 'h'"):
        in_subprocess(show, "ok", TOOLKIT_CONV_TILES="h")


def test_the_sweeps_best_is_named_only_if_it_beat_causal_conv1d(tmp_path, monkeypatch, capsys):
    bench = load_benchmark("conv_kernel", monkeypatch)
    ms = {"triton_default": {"layer": 0.84}, "triton_t2_h512_w8": {"layer": 0.60},
          "triton_t1_h512": {"layer": 0.79}, "causal_conv1d": {"layer": 0.64}}  # fmt: skip
    assert bench.best_variant({"ms": {"triton_t1_h512": {"layer": 0.79}}}) == "t1_h512"  # no GPU
    path = tmp_path / "sweep.json"
    for reference, printed, said in ((0.64, "t2_h512_w8\n", ""), (0.5, "", "none of our")):
        path.write_text(json.dumps({"ms": ms | {"causal_conv1d": {"layer": reference}}}))
        monkeypatch.setattr(sys, "argv", ["conv_kernel.py", "--best", str(path)])
        bench.main()  # the command line's path: prints the variant, or says why not
        out = capsys.readouterr()
        assert out.out == printed and said in out.err, (reference, out)


def test_kernel_resources_compiles_the_kernels_each_setting_runs(monkeypatch):
    """benchmarks/kernel_resources.py --conv names the kernels conv_silu_forward and
    conv_silu_backward launch at a variant (t2: the tiled forward, the stream backward), with
    the variant's tiles; compiled for sm_90 here where Triton has its CUDA tools."""
    triton = pytest.importorskip("triton")
    import toolkit.model.conv_kernel as ck

    resources = load_benchmark("kernel_resources", monkeypatch)
    for variant, forward, backward in (
        ("default", ck._conv_silu_fwd_kernel, ck._conv_silu_bwd_kernel),
        ("t1_h256", ck._conv_silu_fwd_stream_kernel, ck._conv_silu_bwd_stream_kernel),
        ("t2_h256", ck._conv_silu_fwd_kernel, ck._conv_silu_bwd_stream_kernel),
    ):
        kernels = resources.conv_kernels(variant)
        assert [fn for fn, *_ in kernels.values()] == [forward, backward], variant
    (_, tile, *_), (_, run, *_) = resources.conv_kernels("t2_h256_b64").values()
    assert run["BC"] == 256 and tile["BL"] == 64
    if not (Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump").exists():
        pytest.skip("Triton without its CUDA tools")
    for fn, constants, dtypes, warps, stages in resources.conv_kernels("t2_h256").values():
        _, sass = resources.cuobjdump(fn, constants, dtypes, warps, stages, "-sass")
        assert "LDG" in sass, fn


def test_the_backend_and_recompute_are_recipe_keys():
    recipe = load_recipe(ROOT / "recipes/800m_hybrid.toml", ['model.mamba_conv_backend="triton"'])
    assert recipe.model.mamba_conv_backend == "triton"
    with pytest.raises(RecipeError, match="mamba_conv_backend"):
        load_recipe(ROOT / "recipes/800m_hybrid.toml", ['model.mamba_conv_backend="cuda"'])
    keep = load_recipe(ROOT / "recipes/800m_hybrid.toml", ["model.mamba_recompute=false"])
    assert keep.model.mamba_recompute is False
    with pytest.raises(RecipeError, match="mamba_recompute"):
        load_recipe(ROOT / "recipes/800m_hybrid.toml", ['model.mamba_recompute="sometimes"'])


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.skipif(
    CUDA and not fused_mamba_available(conv="causal_conv1d"), reason="needs mamba-ssm"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "backend, recompute, tolerance",
    [("triton", True, 2e-2), ("triton", False, 2e-2), ("causal_conv1d", False, 2e-3)],
)
def test_fused_op_matches_mamba_ssms_on_the_gpu(dtype, backend, recompute, tolerance, monkeypatch):
    """The mixer through our op and through mamba-ssm's (causal-conv1d's conv, recomputing)
    from the same weights at the 800M's mixer widths (shorter sequences): the output and every
    gradient within the two convs' rounding (our conv), or within the order of atomic sums
    (causal-conv1d's conv, the states kept), fp32 parameters under bf16 autocast and bf16
    parameters; the conv's forward ran twice with `recompute` and once without, its backward
    once, and the backward from the kept states once without."""
    from toolkit.model import fused_mamba
    from toolkit.model.mamba2 import Mamba2Mixer

    calls = []
    for name in ("conv_forward", "conv_backward", "ssd_backward_from_states"):
        function = getattr(fused_mamba, name)
        monkeypatch.setattr(
            fused_mamba, name, lambda *a, f=function, n=name, **k: calls.append(n) or f(*a, **k)
        )

    torch.manual_seed(0)
    ours = Mamba2Mixer(1024, conv_backend=backend, recompute=recompute, fused=True)
    ours = ours.cuda().to(dtype)
    theirs = Mamba2Mixer(1024, fused=True).cuda().to(dtype)
    theirs.load_state_dict(ours.state_dict())
    u = torch.randn(2, 1000, 1024, device="cuda", dtype=dtype)
    dout = torch.randn_like(u)
    results = []
    for mixer in (ours, theirs):
        with torch.autocast("cuda", torch.bfloat16):
            out = mixer(u)
        out.backward(dout)
        results.append((out.float(), {n: p.grad.float() for n, p in mixer.named_parameters()}))
    expected = ["conv_forward", "conv_forward", "conv_backward"]
    if not recompute:
        expected = ["conv_forward", "ssd_backward_from_states", "conv_backward"]
    assert calls == expected, calls
    (a, ga), (b, gb) = results
    if fused_mamba.TRITON_MAMBA - {"dstates"}:  # our norm, forward or chunk gradients: their
        tolerance = max(tolerance, 2e-2)  # own rounding (bf16 outputs a ulp apart), as our conv
    assert (a - b).abs().max() <= tolerance * b.abs().max()
    for n, g in gb.items():
        err = (ga[n] - g).norm() / g.norm()
        assert err <= tolerance, (n, err.item())
