"""Flash decoding for the static decode step (toolkit/model/flash_decoding.py): the kernels
against decode_attention and an fp64 softmax, the new keys written where the torch step writes
them, and the engine's static step sending its attention through them. On a CPU the kernels run
under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before Triton compiles
anything); on a GPU, at the 8B's shapes and in the recorded graphs."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_config
from toolkit.model import HybridLM, flash_decoding
from toolkit.model.attention import decode_attention

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def case(
    b: int, groups: int, heads: int, d: int, span: int, lengths: list[int], dtype: torch.dtype,
    device: str = "cpu", spare: int = 5,
) -> dict:  # fmt: skip
    """Inputs as the static step hands them over: q a strided view, the cache views of a longer
    cache (`spare` positions past the span), the new keys views of a wider tensor."""
    g = torch.Generator().manual_seed(b * 1000 + span)
    new = torch.randn(b, groups, heads + 2, d, generator=g).to(device, dtype)
    cache = torch.randn(2, b, groups, span + spare, d, generator=g).to(device, dtype)
    return dict(
        q=new[:, :, :heads],
        k_new=new[:, :, heads],
        v_new=new[:, :, heads + 1],
        k_cache=cache[0],
        v_cache=cache[1],
        lengths=torch.tensor(lengths, device=device),
        span=span,
    )


def written(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches after the torch step's writes of the new keys at each row's length."""
    k, v = c["k_cache"].clone(), c["v_cache"].clone()
    rows = torch.arange(k.size(0), device=k.device)
    k[rows, :, c["lengths"]] = c["k_new"]
    v[rows, :, c["lengths"]] = c["v_new"]
    return k, v


def run_kernel(c: dict, plan: flash_decoding.Plan | None = None) -> torch.Tensor:
    """The kernels' output; c's caches hold the new keys afterwards."""
    span = c["span"]
    k, v = c["k_cache"][:, :, :span], c["v_cache"][:, :, :span]
    return flash_decoding.attend(c["q"], c["k_new"], c["v_new"], k, v, c["lengths"], plan)


def check_case(c: dict, plan: flash_decoding.Plan | None = None, truncates: bool = False) -> None:
    """The kernels against the fp64 softmax (within one rounding of the output, and of the
    probabilities to the values' dtype: 2^-8 of sum p|v|) and against decode_attention (which
    also rounds the scores to bf16), the caches written as the torch step writes them."""
    k, v = written(c)
    span = c["span"]
    k, v = k[:, :, :span], v[:, :, :span]
    mask = c["lengths"][:, None, None, None] >= torch.arange(span, device=k.device)
    got = run_kernel(c, plan)
    k_after, v_after = written(c)  # writing again changes nothing if the kernel wrote them
    assert torch.equal(c["k_cache"], k_after) and torch.equal(c["v_cache"], v_after)
    assert got.shape == c["q"].shape and got.dtype == c["q"].dtype

    scores = c["q"].double() @ k.double().transpose(-1, -2) / k.size(-1) ** 0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    want = probs @ v.double()
    scale = probs @ v.double().abs()
    if c["q"].dtype == torch.float32:
        bound = 1e-5 * scale
    else:  # an output ulp (the interpreter truncates: a whole one), p rounded to the values'
        bound = 2.0 ** (-7 if truncates else -8) * want.abs() + 2.0**-7 * scale
    error = (got.double() - want).abs()
    assert (error <= bound + 1e-6).all(), (error / scale).max()

    reference = decode_attention(c["q"], k, v, mask).double()
    if c["q"].dtype == torch.float32:
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
    else:  # its scores rounded to bf16 first: up to ~2^-8 of a logit of a few units
        torch.testing.assert_close(got.double(), reference, rtol=0.03, atol=0.03)


SHAPES = list(itertools.product([1, 3], [1, 2], [1, 4], [16, 64], [torch.bfloat16, torch.float32]))


def lengths_for(b: int, span: int) -> list[int]:
    """Length 0 (only key 0 visible), span - 1 (every key), and one between."""
    return [span - 1] if b == 1 else [0, span - 1, span // 3][:b]


KERNEL_CHECK = r"""
import torch
from tests.test_flash_decoding import SHAPES, case, check_case, lengths_for
from toolkit.model import flash_decoding
from toolkit.model.flash_decoding import Plan

# Spans that no block divides; the default plan (a few splits here) and many short splits,
# most of them past some row's length (empty: they must contribute nothing).
for i, (b, groups, heads, d, dtype) in enumerate(SHAPES):
    span = (77, 130, 300)[i % 3]
    plan = None if i % 2 else Plan(block=16, keys_per_split=32, splits=-(-span // 32))
    check_case(case(b, groups, heads, d, span, lengths_for(b, span), dtype), plan, truncates=True)
check_case(case(1, 2, 4, 64, 40, [0], torch.bfloat16), truncates=True)  # one key at all
check_case(case(2, 1, 4, 32, 64, [63, 17], torch.float16), Plan(32, 32, 2), truncates=True)
for pairs, span in [(1, 300), (16, 4096), (8, 32768), (256, 32768)]:
    plan = flash_decoding.plan_for(pairs, span, torch.device("cpu"))
    assert plan.keys_per_split % plan.block == 0 and plan.splits <= flash_decoding.MAX_SPLITS
    assert (plan.splits - 1) * plan.keys_per_split < span <= plan.splits * plan.keys_per_split
print("kernels agree")
"""


@pytest.mark.long  # make test-long: ~10 s under Triton's interpreter
def test_kernels_under_the_interpreter():
    """32 shapes (rows 1 and 3, groups 1 and 2, 1 and 4 heads per group, head_dim 16 and 64,
    bf16 and fp32) with rows at length 0, span - 1 and between, spans no block divides, empty
    splits: the fp64 softmax within bf16 rounding, decode_attention within its own rounding,
    and the new keys written into the cache."""
    run_interpreted(KERNEL_CHECK, "kernels agree")


ENGINE_CHECK = r"""
import os
import torch
from tests.test_cuda_graph import record_decodes
from tests.test_flash_decoding import hybrid
from toolkit.inference.engine import Engine, Request
from toolkit.model import flash_decoding_kernel
from toolkit.tokenizer import ByteTokenizer

calls = []
launch = flash_decoding_kernel.launch
flash_decoding_kernel.launch = lambda *a: (calls.append(a[0].shape), launch(*a))[1]
model = hybrid()
attention_layers = model.layout.pattern.count("*")
runs = {}
for label in ("kernel", "off"):
    calls.clear()
    if label == "off":
        os.environ["TOOLKIT_TRITON_ATTENTION"] = "off"
    engine = Engine(model, ByteTokenizer(), slots=2, max_len=64, cuda_graphs=True)
    seen = record_decodes(engine)
    done = engine.run([
        Request(prompt=[3, 1, 4, 1, 5], max_new_tokens=6, stop_at_eod=False),
        Request(prompt=[2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5], max_new_tokens=5, stop_at_eod=False),
    ])
    runs[label] = ([r.tokens for r in done], torch.cat(seen), len(calls), len(seen))
(tokens, logits, n, steps), (tokens_off, logits_off, n_off, _) = runs["kernel"], runs["off"]
# Every attention layer of every static step through the kernels; none with them off.
assert n == attention_layers * steps and n_off == 0, (n, attention_layers, steps)
assert tokens == tokens_off, (tokens, tokens_off)
torch.testing.assert_close(logits, logits_off, rtol=0.05, atol=0.05)
print("engine agrees")
"""


def hybrid() -> HybridLM:
    """A tiny bf16 hybrid whose attention takes the kernels (head_dim 16, 2 heads per group)."""
    torch.manual_seed(0)
    cfg = tiny_model_config(hidden_size=64, seq_length=64)
    return HybridLM(cfg, vocab_size=256).to(torch.bfloat16).eval()


@pytest.mark.long  # ~10 s under Triton's interpreter
def test_engine_static_step_through_the_kernels_under_the_interpreter():
    """A bf16 hybrid's engine (CUDA graphs asked for: on a CPU the static step runs eagerly),
    two rows at different lengths: every attention layer of every step through the kernels,
    the same greedy tokens as with TOOLKIT_TRITON_ATTENTION=off, logits close."""
    run_interpreted(ENGINE_CHECK, "engine agrees")


def run_interpreted(script: str, done: str) -> None:
    pytest.importorskip("triton")
    if CUDA:  # the GPU tests below run the compiled kernels
        pytest.skip("on a GPU the compiled kernels are tested")
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}"}
    env["TOOLKIT_TRITON_GEMV"] = "off"  # the products as the reference's (and faster here)
    env.pop("TOOLKIT_TRITON_ATTENTION", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and done in out.stdout, out.stdout + out.stderr


def test_policy_keeps_the_torch_path_where_the_kernels_do_not_run(monkeypatch):
    """CPU tensors without the interpreter, fp32, head_dim 8, or TOOLKIT_TRITON_ATTENTION=off:
    decode_attention."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    assert not flash_decoding.takes(q, q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if flash_decoding.triton_imports():
        assert flash_decoding.takes(q, q)
    assert not flash_decoding.takes(q.float(), q.float())
    assert not flash_decoding.takes(q[..., :8], q[..., :8])
    assert not flash_decoding.takes(q[..., :48], q[..., :48])
    monkeypatch.setenv("TOOLKIT_TRITON_ATTENTION", "off")
    assert not flash_decoding.takes(q, q)


@pytest.mark.parametrize(
    "pairs, span, splits",
    [(1, 300, 5), (8, 4096, 2), (8, 32768, 2), (256, 32768, 1), (1, 100_000, 16)],
)
def test_plan_covers_the_span_in_whole_blocks(pairs, span, splits):
    """Under the interpreter's pretend 8 SMs (2 programs each): splits of whole blocks that
    cover the span, none empty of positions."""
    plan = flash_decoding.plan_for(pairs, span, torch.device("cpu"))
    assert plan.splits == splits
    assert plan.keys_per_split % plan.block == 0
    assert (plan.splits - 1) * plan.keys_per_split < span <= plan.splits * plan.keys_per_split


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("span", [4096, 32768])
@pytest.mark.parametrize("b", [1, 4])
def test_kernels_at_the_8b_shapes_on_cuda(span, b):
    """8 groups of 4 query heads, head_dim 128, bf16, at the H200's plan: within bf16 rounding
    of the fp64 softmax and of decode_attention, keys written."""
    lengths = [span - 1, 0, span // 2 + 3, 1000][:b]
    check_case(case(b, 8, 4, 128, span, lengths, torch.bfloat16, "cuda"))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_graph_engine_decodes_as_without_the_kernels_on_cuda(monkeypatch):
    """A bf16 hybrid's engine on the GPU (CUDA graphs recorded and replayed, two rows at
    different lengths): the same greedy tokens with the kernels as with
    TOOLKIT_TRITON_ATTENTION=off, the kernels launched while recording."""
    from toolkit.inference.engine import Engine, Request
    from toolkit.model import flash_decoding_kernel
    from toolkit.tokenizer import ByteTokenizer

    calls = []
    launch = flash_decoding_kernel.launch
    monkeypatch.setattr(
        flash_decoding_kernel, "launch", lambda *a: (calls.append(a[0].shape), launch(*a))[1]
    )
    model = hybrid().cuda()
    out = {}
    for label in ("kernel", "off"):
        if label == "off":
            monkeypatch.setenv("TOOLKIT_TRITON_ATTENTION", "off")
        calls.clear()
        engine = Engine(model, ByteTokenizer(), slots=2, max_len=512)
        requests = [
            Request(prompt=[3, 1, 4, 1, 5, 9, 2, 6], max_new_tokens=16, stop_at_eod=False),
            Request(prompt=[i % 256 for i in range(300)], max_new_tokens=12, stop_at_eod=False),
        ]
        out[label] = [r.tokens for r in engine.run(requests)]
        assert engine.decoder.error is None and engine.decoder.graphs
        assert bool(calls) == (label == "kernel")
    assert out["kernel"] == out["off"]
