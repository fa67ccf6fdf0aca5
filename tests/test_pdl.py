"""Programmatic dependent launch for the decode step's Triton kernels (toolkit/inference/pdl.py):
the switch, each kernel compiled and launched with PDL exactly where it is on, the PDL variants
computing bit for bit what the plain ones do (under Triton's interpreter, its grid dependency
calls as no-ops, and on a GPU at the 8B's shapes), and the CUDA-graph engine decoding the same
tokens without PDL (TOOLKIT_TRITON_PDL=norms)."""

import pytest
import torch

from tests.test_decode_norms import run_interpreted
from toolkit.inference import gemm_rows, gemv, pdl

CUDA = torch.cuda.is_available()
SHAPES_8B = [(18560, 4096), (4096, 8192), (16384, 4096), (4096, 16384), (6144, 4096)]


def test_switch(monkeypatch):
    """On by default and with TOOLKIT_TRITON_PDL=on, except under the interpreter, on a CPU
    tensor and before compute capability 9.0; off with =norms (our norms only) and =off (not
    our norms either); a misspelt value is an error naming the variable."""
    monkeypatch.delenv("TOOLKIT_TRITON_PDL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability["value"])
    pdl._supported.cache_clear()
    cuda = torch.device("cuda", 0)
    try:
        assert pdl.enabled(cuda) and pdl.our_norms()
        monkeypatch.setenv("TOOLKIT_TRITON_PDL", "off")
        assert not pdl.enabled(cuda) and not pdl.our_norms()
        monkeypatch.setenv("TOOLKIT_TRITON_PDL", "norms")
        assert not pdl.enabled(cuda) and pdl.our_norms()
        monkeypatch.setenv("TOOLKIT_TRITON_PDL", "yes")
        with pytest.raises(ValueError, match="TOOLKIT_TRITON_PDL='yes'"):
            pdl.enabled(cuda)
        monkeypatch.setenv("TOOLKIT_TRITON_PDL", "on")
        assert pdl.enabled(cuda) and not pdl.enabled(torch.device("cpu"))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not pdl.enabled(cuda)
        monkeypatch.delenv("TRITON_INTERPRET")
        capability["value"] = (8, 0)
        pdl._supported.cache_clear()
        assert not pdl.enabled(cuda)
    finally:
        pdl._supported.cache_clear()


class _Recorder:
    """Stands in for a Triton kernel: records each launch's keyword arguments."""

    def __init__(self) -> None:
        self.launches: list[dict] = []

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        return lambda *args, **kwargs: self.launches.append(kwargs)


@pytest.mark.parametrize("on", [True, False])
def test_each_kernel_compiled_and_launched_with_pdl_where_it_is_on(on, monkeypatch):
    """PDL (the kernel's constexpr) and launch_pdl (how it is launched) both follow
    pdl.enabled, for the products' two kernels and the two norms."""
    pytest.importorskip("triton")
    from toolkit.inference import decode_norms_kernel, gemm_rows_kernel, gemv_kernel

    monkeypatch.setattr(pdl, "enabled", lambda device: on)
    kernels = {}
    for module, name in (
        (gemv_kernel, "_gemv_kernel"),
        (gemm_rows_kernel, "_rows_kernel"),
        (decode_norms_kernel, "_add_rms_norm_kernel"),
        (decode_norms_kernel, "_gated_rms_norm_kernel"),
    ):
        kernels[name] = _Recorder()
        monkeypatch.setattr(module, name, kernels[name])
    w, x, y = torch.zeros(8, 32), torch.zeros(2, 32), torch.zeros(2, 8)
    gemv_kernel.launch(w, x[0], y[0], gemv.tile_for(8, 32))
    gemm_rows_kernel.launch(w, x, y, gemm_rows.tile_for(8, 32))
    decode_norms_kernel.launch_add_norm(x, x, w[0], 1e-5, x.clone(), x.clone())
    decode_norms_kernel.launch_gated_norm(x, x, w[0], 1e-5, 2, x.clone())
    for name, kernel in kernels.items():
        assert [(k["PDL"], k["launch_pdl"]) for k in kernel.launches] == [(on, on)], name


KERNEL_CHECK = r"""
import sys, torch, triton.language.extra.cuda as gdc
from tests.test_cuda_graph import record_decodes
from tests.test_flash_decoding import hybrid
from toolkit.inference import gemm_rows, gemv, pdl
from toolkit.inference.engine import Engine, Request
from toolkit.tokenizer import ByteTokenizer

# The interpreter has no grid dependency control: here the calls do nothing (but note the kernel
# that waits), so that the PDL variants' code (a product's first weight tile before the wait)
# runs and is compared with the plain one.
waited = set()
gdc.gdc_wait = lambda: waited.add(sys._getframe(1).f_code.co_name)
gdc.gdc_launch_dependents = lambda: None
enabled = {"on": False}
pdl.enabled = lambda device: enabled["on"]

def both(f):
    outs = []
    for on in (False, True):
        enabled["on"] = on
        outs.append(f())
    return outs

torch.manual_seed(0)
T, R = gemv.Tile, gemm_rows.Tile
for n, k, tile, rows_tile in [(50, 70, T(8, 32, 4, 1, False), R(16, 32, 4, 3)),
                              (33, 200, T(4, 128, 4, 1, True), R(32, 64, 4, 3)),
                              (16, 30, T(4, 32, 4, 1, True), R(16, 32, 4, 3))]:  # one tile
    w = torch.randn(n, k, dtype=torch.bfloat16)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    plain, early = both(lambda: gemv.gemv(x, w, tile, activation="gelu"))
    assert torch.equal(plain, early), (n, k)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    plain, early = both(lambda: gemm_rows.gemm_rows(x, w, rows_tile))
    assert torch.equal(plain, early), (n, k)

# A bf16 hybrid's engine (attention through flash decoding), two requests and then one: the same
# logits, bit for bit, each step.
model = hybrid()
runs = []
for on in (False, True):
    enabled["on"] = on
    engine = Engine(model, ByteTokenizer(), slots=2, max_len=64, cuda_graphs=True)
    seen = record_decodes(engine)
    done = engine.run([Request(prompt=[3, 1, 4, 1, 5], max_new_tokens=5, stop_at_eod=False),
                       Request(prompt=[2, 7, 1], max_new_tokens=2, stop_at_eod=False)])
    runs.append(([r.tokens for r in done], torch.cat(seen)))
assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1]), runs
kernels = {"_gemv_kernel", "_rows_kernel", "_add_rms_norm_kernel", "_gated_rms_norm_kernel",
           "_split_kernel", "_combine_kernel"}  # flash decoding's two passes: the attention layer
assert waited == kernels, waited
print("pdl variants agree")
"""


@pytest.mark.long  # make test-long (CI runs it): ~15 s under Triton's interpreter
def test_pdl_variants_compute_what_the_plain_kernels_do_under_the_interpreter():
    """The kernels' PDL variants (the products' first step peeled before the wait) under the
    interpreter with the grid dependency calls as no-ops: bit for bit the plain kernels'
    products at shapes the tiles do and do not divide, and a bf16 hybrid's decode steps (each
    kernel of the step, norms and flash decoding included, waiting)."""
    run_interpreted(KERNEL_CHECK, "pdl variants agree")


def _with_and_without_pdl(f, monkeypatch):  # noqa: ANN001, ANN202
    outs = []
    for setting in ("on", "norms"):  # our norms both times: only the launches differ
        monkeypatch.setenv("TOOLKIT_TRITON_PDL", setting)
        outs.append(f())
    return outs


needs_hopper = pytest.mark.skipif(
    not (CUDA and torch.cuda.get_device_capability() >= (9, 0)), reason="needs a Hopper GPU"
)


@needs_hopper
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("shape", SHAPES_8B)
def test_products_with_pdl_equal_those_without_on_cuda(shape, rows, monkeypatch):
    """The 8B's products at their tuned tiles (one row: gemv.py's; 8: gemm_rows.py's), bit for
    bit with and without PDL."""
    monkeypatch.setenv("TOOLKIT_TRITON_PDL", "on")
    assert pdl.enabled(torch.device("cuda"))
    torch.manual_seed(0)
    n, k = shape
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    product = gemv.gemv if rows == 1 else gemm_rows.gemm_rows
    with_pdl, without = _with_and_without_pdl(lambda: product(x, w), monkeypatch)
    assert torch.equal(with_pdl, without)


@needs_hopper
@pytest.mark.parametrize("rows", [1, 8])
def test_norms_with_pdl_equal_those_without_on_cuda(rows, monkeypatch):
    from toolkit.inference import decode_norms
    from toolkit.model.norms import GatedRMSNorm, RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(4096).to(device="cuda", dtype=torch.bfloat16)
    gated = GatedRMSNorm(8192, 8).to(device="cuda", dtype=torch.bfloat16)
    x, r = (torch.randn(rows, 1, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    y, z = (torch.randn(rows, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def norms() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return (*decode_norms.add_norm(x, r, norm), decode_norms.gated_norm(gated, y, z))

    with_pdl, without = _with_and_without_pdl(norms, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(with_pdl, without, strict=True))


@needs_hopper
def test_graph_engine_decodes_as_without_pdl_on_cuda(monkeypatch):
    """A bf16 hybrid's engine on the GPU (CUDA graphs, batch 1, then three requests at once):
    the same greedy tokens and the same logits, bit for bit, with TOOLKIT_TRITON_PDL=norms (a
    kernel reading before the one it depends on had finished would show here)."""
    from tests.test_cuda_graph import record_decodes
    from tests.test_flash_decoding import hybrid
    from toolkit.inference.engine import Engine, Request
    from toolkit.tokenizer import ByteTokenizer

    model = hybrid().cuda()  # attention through flash decoding
    prompts = ([3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1], [8, 2, 8, 1, 8, 2])

    def decode(requests: int) -> tuple[list[list[int]], torch.Tensor]:
        engine = Engine(model, ByteTokenizer(), slots=4, max_len=128, overlap=False)
        seen = record_decodes(engine)
        done = engine.run(
            [Request(prompt=p, max_new_tokens=24, stop_at_eod=False) for p in prompts[:requests]]
        )
        return [r.tokens for r in done], torch.cat(seen)

    for requests in (1, 3):
        (tokens, logits), (tokens_off, logits_off) = _with_and_without_pdl(
            lambda r=requests: decode(r), monkeypatch
        )
        assert tokens == tokens_off, (requests, tokens, tokens_off)
        assert torch.equal(logits, logits_off), (requests, (logits - logits_off).abs().max())
