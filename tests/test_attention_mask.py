"""The causal alignment of a piece that follows cached keys: query i of a piece at offset o sees
keys up to o + i (bottom-right), through SDPA's lower-right causal bias (no mask in memory: flash
attention on the GPU) or an explicit mask built once per forward, and the two agree. Rows at
different offsets (ragged) keep an explicit mask, also built once per forward and never reused
for other offsets. The training path (is_causal) and the one-token decode (no mask) unchanged."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from tests.conftest import load_benchmark, tiny_model_config
from toolkit.model import HybridLM, attention
from toolkit.model.attention import Attention, KVCache, Rotary, causal_after_cache

TIGHT = dict(rtol=1e-5, atol=1e-6)  # fp32, the same arithmetic up to the order of sums
PAIRS = [(2, 3), (3, 8), (8, 9), (5, 37), (16, 64), (64, 65), (7, 200)]  # (q_len, kv_len)
HEADS = [(4, 4), (4, 2), (6, 1)]  # (heads, groups): plain, GQA, MQA


def explicit(q_len: int, kv_len: int) -> torch.Tensor:
    """The mask written out: query i sees keys 0 .. kv_len - q_len + i."""
    return torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)


@pytest.mark.parametrize("heads,groups", HEADS)
@pytest.mark.parametrize("q_len,kv_len", PAIRS)
def test_lower_right_bias_equals_the_explicit_mask(monkeypatch, q_len, kv_len, heads, groups):
    """causal_after_cache's two answers (the bias, forced here on the CPU, and the mask) give
    SDPA the same numbers, and they are bottom-right: the top-left alignment differs."""
    torch.manual_seed(q_len * kv_len)
    q = torch.randn(2, heads, q_len, 16)
    k, v = torch.randn(2, 2, groups, kv_len, 16).unbind(0)
    gqa = heads != groups
    offset = kv_len - q_len
    monkeypatch.setattr(attention, "lower_right_bias", lambda _: True)
    bias = causal_after_cache(q, offset, kv_len)
    assert isinstance(bias, CausalBias)
    monkeypatch.setattr(attention, "lower_right_bias", lambda _: False)
    mask = causal_after_cache(q, offset, kv_len)
    assert torch.equal(mask, explicit(q_len, kv_len))
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    torch.testing.assert_close(got, want, **TIGHT)
    top_left = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
    wrong = F.scaled_dot_product_attention(q, k, v, attn_mask=top_left, enable_gqa=gqa)
    assert (wrong - want).abs().max() > 1e-3


@pytest.mark.parametrize("lower_right", [True, False])
@pytest.mark.parametrize("heads,groups,rope", [(4, 4, False), (4, 2, True), (4, 1, False)])
def test_a_piece_after_cached_keys_equals_the_whole_sequence(
    monkeypatch, lower_right, heads, groups, rope
):
    """Through the layer: pieces of several lengths after cached keys, by either path, give the
    rows of the whole sequence's causal forward (the training path)."""
    torch.manual_seed(0)
    monkeypatch.setattr(attention, "lower_right_bias", lambda _: lower_right)
    rotary = Rotary(32 // heads, 0.5) if rope else None
    attn = Attention(32, num_heads=heads, num_groups=groups, rotary=rotary).eval()
    x = torch.randn(2, 80, 32)
    with torch.no_grad():
        full = attn(x)
        cache = attn.allocate_state(2, 80, torch.device("cpu"), torch.float32)
        bounds = [0, 5, 6, 9, 25, 79, 80]  # pieces of 5, 1 (decode), 3, 16, 54, 1
        pieces = [attn(x[:, a:b], cache) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(pieces, 1), full, **TIGHT)


def hybrid(pattern: str = "*M*-") -> HybridLM:
    cfg = tiny_model_config(num_layers=len(pattern), pattern=pattern, att_ratio=0.0, mlp_ratio=0.0)
    return HybridLM(cfg, vocab_size=50).double().eval()


def spy_sdpa(monkeypatch) -> list[dict]:
    """The attn_mask and is_causal of every SDPA call the layers make, appended as they run."""
    calls: list[dict] = []
    real = F.scaled_dot_product_attention
    inside: list[bool] = []  # the bias's own call (the CPU materialises it) is not the layer's

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        if not inside:
            calls.append(dict(mask=attn_mask, causal=is_causal, q_len=q.size(-2)))
        if not isinstance(attn_mask, CausalBias):
            return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
        inside.append(True)  # its hook looks for SDPA by identity: call it directly
        try:
            return CausalBias._dispatch(q, k, v, attn_mask, is_causal=is_causal, **kw)
        finally:
            inside.pop()

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_one_mask_per_forward_and_the_other_paths_unchanged(monkeypatch):
    """A prefill piece through DecodeStates.rows (the engine's passes) builds its mask once for
    all layers (the CPU's explicit mask; the GPU's bias is none at all); the training forward
    stays is_causal without a mask, the one-token decode maskless and not causal."""
    model = hybrid()
    tokens = torch.randint(0, 50, (2, 12))
    calls = spy_sdpa(monkeypatch)
    with torch.no_grad():
        model(tokens)
        assert calls and all(c["mask"] is None and c["causal"] for c in calls)  # training
        calls.clear()
        states = model.allocate_states(2, max_len=12)
        model(tokens[:, :4], states.rows(2))  # offset 0: is_causal over the piece itself
        assert all(c["mask"] is None and c["causal"] for c in calls)
        calls.clear()
        model(tokens[:, 4:9], states.rows(2, seen=4))
        assert len(calls) == 2 and not any(c["causal"] for c in calls)
        assert calls[0]["mask"] is calls[1]["mask"]  # built by the first layer only
        assert torch.equal(calls[0]["mask"], explicit(5, 9))
        calls.clear()
        monkeypatch.setattr(attention, "lower_right_bias", lambda _: True)
        model(tokens[:, 9:11], states.rows(2, seen=9))
        assert all(isinstance(c["mask"], CausalBias) for c in calls)
        calls.clear()
        model(tokens[:, 11:12], states.rows(2, seen=11))  # decode: no mask, not causal
        assert all(c["mask"] is None and not c["causal"] and c["q_len"] == 1 for c in calls)


def test_the_ragged_mask_is_built_once_per_forward_and_only_reused_there(monkeypatch):
    """Rows at different lengths (views from DecodeStates.decode_rows, as the engine's eager
    decode makes them): one mask build per forward however many attention layers, and forwards
    of the same views continuing (1, 1, then 3 tokens per row: the same piece length twice, a
    stale mask would be reused there) equal the whole sequence."""
    model = hybrid("*-**")
    lengths = torch.tensor([3, 9, 5])
    tokens = torch.randint(0, 50, (3, 16))
    rows = torch.arange(3)[:, None]
    builds: list[int] = []
    real = attention.RaggedPiece

    def counted(**kw):
        builds.append(kw["length"])
        return real(**kw)

    monkeypatch.setattr(attention, "RaggedPiece", counted)
    with torch.no_grad():
        full = model(tokens)
        states = model.allocate_states(3, max_len=16)
        for r, n in enumerate(lengths.tolist()):
            one = [s and KVCache(s.k[r : r + 1], s.v[r : r + 1]) for s in states]
            model(tokens[r : r + 1, :n], one)
        views = states.decode_rows(3, lengths)
        done = 0
        for width in (1, 1, 3):
            pos = lengths[:, None] + done + torch.arange(width)
            builds.clear()
            torch.testing.assert_close(model(tokens[rows, pos], views), full[rows, pos], **TIGHT)
            assert builds == [width]  # three attention layers, one build
            done += width


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@needs_cuda
@pytest.mark.parametrize("q_len,kv_len", [(2048, 8192), (512, 2048), (17, 300)])
def test_gpu_lower_right_bias_runs_flash_and_equals_the_explicit_mask_in_bf16(q_len, kv_len):
    """The 8B's attention shape (32 query heads over 8 groups of 128 channels), bf16: the
    lower-right bias runs flash attention (the profiler names it) and its output is within 1e-2
    relative L2 of the explicit mask's (cuDNN or the efficient kernel), both within 1e-2 of the
    fp32 answer (bf16's own rounding is ~4e-3); the top-left alignment is far off."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    q = torch.randn(1, 32, q_len, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 8, kv_len, 128, device="cuda", dtype=torch.bfloat16).unbind(0)
    assert attention.lower_right_bias(q)
    bias = causal_after_cache(q, kv_len - q_len, kv_len)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        torch.cuda.synchronize()
    assert any("flash" in e.name for e in prof.events()), "flash attention did not run"
    mask = explicit(q_len, kv_len).cuda()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    qf, kf, vf = q.float(), k.float(), v.float()
    exact = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, enable_gqa=True)
    assert rel_l2(got, want) < 1e-2
    assert rel_l2(got, exact) < 1e-2 and rel_l2(want, exact) < 1e-2
    top_left = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True)
    assert rel_l2(top_left, exact) > 0.1


@needs_cuda
def test_gpu_bf16_pieces_after_cached_keys_equal_the_explicit_mask_path(monkeypatch):
    """Through the layer on the GPU in bf16: pieces of 256, 1000 and 7 after cached keys by the
    bias (the default there) and by the explicit mask agree within 1e-2 relative L2."""
    torch.manual_seed(0)
    attn = Attention(1024, num_heads=8, num_groups=2, head_dim=128).cuda().bfloat16().eval()
    x = torch.randn(2, 1263, 1024, device="cuda", dtype=torch.bfloat16)
    outs = []
    for lower_right in (True, False):
        monkeypatch.setattr(
            attention, "lower_right_bias", lambda q, lr=lower_right: lr and q.is_cuda
        )
        cache = attn.allocate_state(2, 1263, torch.device("cuda"), torch.bfloat16)
        with torch.no_grad():
            outs.append(
                torch.cat(
                    [attn(x[:, a:b], cache) for a, b in [(0, 256), (256, 1256), (1256, 1263)]], 1
                )
            )
    assert rel_l2(outs[0], outs[1]) < 1e-2


def test_the_attention_backends_benchmark_runs_each_form_on_a_cpu(tmp_path, monkeypatch):
    """benchmarks/attention_backends.py: the keys' groups passed as they are and repeated to
    every head give the same output and gradients (the math backend, on a CPU)."""
    import json

    bench = load_benchmark("attention_backends", monkeypatch)
    out = tmp_path / "attention.json"
    bench.main(["--batch", "1", "--seq", "32", "--repeats", "1", "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"math gqa", "math repeated"}
    for run in runs.values():
        assert run["ms"] > 0 and max(run["rel_l2"].values()) < 1e-5, run
