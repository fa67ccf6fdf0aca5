"""The static-shape decode step (what the engine replays as CUDA graphs) equals the engine's
eager decode: run eagerly here on the CPU; the graph itself is checked on a GPU only."""

import pytest
import torch
import torch.nn.functional as F

from tests.test_engine import MODELS, TOKENIZER, build, clone, prompts
from toolkit.inference import cuda_graph
from toolkit.inference.cuda_graph import span_bucket
from toolkit.inference.engine import Engine, Request
from toolkit.model import attention, mamba2
from toolkit.model.attention import KVCache
from toolkit.model.kernels import (
    DecodeKernels,
    decode_kernels,
    mamba_ssm_available,
    ssd_mamba_ssm,
)
from toolkit.model.mamba2 import Mamba2Mixer
from toolkit.model.ssd import ssd_chunked

# float64 models: the static step attends over a longer (masked) span and groups the queries of
# a KV group differently, so logits differ from the eager path by rounding only.
LOGIT_TOL = dict(rtol=0.0, atol=1e-10)
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record_decodes(engine: Engine) -> list[torch.Tensor]:
    """The logits each decode step returns (running rows, in slot order)."""
    out: list[torch.Tensor] = []
    decode = engine._decode

    def spy(rows):
        logits = decode(rows)
        out.append(logits.clone())  # a graph's output buffer is overwritten by the next step
        return logits

    engine._decode = spy
    return out


def workload() -> list[Request]:
    """More requests than slots, of different lengths: rows join and leave mid-batch, and rows
    decode side by side at different positions."""
    lengths, new = (5, 12, 1, 9, 20, 3, 7), (14, 4, 17, 9, 6, 11, 8)
    return [
        Request(prompt=p, max_new_tokens=n, stop_at_eod=False, logprobs=True, **extra)
        for p, n, extra in zip(
            prompts(*lengths),
            new,
            [{}, {}, dict(temperature=1.0, seed=3), {}, {}, dict(temperature=0.8, seed=4), {}],
        )
    ]


@pytest.mark.parametrize("buckets", [None, [3]])
@pytest.mark.parametrize("case", sorted(MODELS))
def test_static_decode_equals_eager_engine(case, buckets):
    """Same tokens, same logits at every step; free slots hold garbage that must not leak.
    With batch buckets (None: 1, 2, 3) each step runs the fewest rows that hold the running
    requests, which move down to the lowest slots as others finish; [3]: every slot."""
    torch.manual_seed(0)
    model = build(case)
    # The last one runs on alone at the end.
    requests = workload() + [Request(prompt=[1, 2], max_new_tokens=30, stop_at_eod=False)]
    eager = Engine(model, TOKENIZER, slots=3, cuda_graphs=False)
    # The CPU: eagerly, with the buckets and row moves of the CUDA graphs.
    static = Engine(model, TOKENIZER, slots=3, cuda_graphs=True, decode_buckets=buckets)
    # With every slot decoded, the static batch is larger than the eager one (the running rows
    # only): a float64 matmul rounds differently by batch size (~1e-16), and the Mamba step's
    # fp32 arithmetic can turn that into ~1e-8. Leaked garbage (randn * 10) would be far above.
    tol = dict(rtol=0.0, atol=1e-6) if buckets else LOGIT_TOL
    assert eager.decoder is None and static.decoder is not None
    for s in static.states:  # every slot starts free: fill it with garbage
        for t in () if s is None else (v for v in vars(s).values() if torch.is_tensor(v)):
            t.copy_(torch.randn_like(t.float()) * 10)
    calls = []

    def forward(tokens, views, f=static.decoder.forward):
        # The host's copy of the positions (it picks the span without a sync) stays exact.
        assert static.host_positions == static.positions.tolist()
        # The running requests hold the lowest slots, and the step the smallest bucket.
        assert sorted(static.active) == list(range(len(static.active)))
        assert tokens.size(0) == min(b for b in static.decoder.buckets if b >= len(static.active))
        calls.append(tokens.size(0))
        return f(tokens, views)

    static.decoder.forward = forward
    eager_logits, static_logits = record_decodes(eager), record_decodes(static)
    again = [clone(r) for r in requests]
    eager.run(requests)
    static.run(again)
    assert set(calls) == ({3} if buckets else {1, 2, 3})
    assert [r.tokens for r in again] == [r.tokens for r in requests]
    assert len(static_logits) == len(eager_logits)
    for a, b in zip(static_logits, eager_logits):
        torch.testing.assert_close(a, b, **tol)
    for r, r0 in zip(again, requests):
        torch.testing.assert_close(r.token_logprobs, r0.token_logprobs, **tol)


@pytest.mark.parametrize("case", sorted(MODELS))
def test_overlapped_decode_equals_the_eager_engine(case):
    """Launching each step before the host reads the previous one's tokens (which reach the
    graph's input on the device) gives every request the same tokens and logprobs, with rows
    joining, finishing and sampling, and stop strings; steps launched for a request that then
    finished are thrown away."""
    torch.manual_seed(0)
    model = build(case)
    requests = workload() + [
        Request(prompt=[5, 6], max_new_tokens=1, stop_at_eod=False),  # done at its prefill
        Request(prompt=[7], max_new_tokens=0),
        Request(prompt=[8, 9, 10], max_new_tokens=12, stop=["e", "a"], top_logprobs=2),
    ]
    eager = Engine(model, TOKENIZER, slots=3, cuda_graphs=False)
    overlapped = Engine(model, TOKENIZER, slots=3, cuda_graphs=True, overlap=True)
    assert overlapped.overlap and not Engine(model, TOKENIZER, slots=3, overlap=True).overlap
    events = []
    launch, apply = overlapped._launch, overlapped._apply

    def spy_launch(owners, **kw):
        events.append("launch")
        return launch(owners, **kw)

    def spy_apply(*args):
        events.append("apply")
        return apply(*args)

    overlapped._launch, overlapped._apply = spy_launch, spy_apply
    moves, move = [], overlapped._move
    overlapped._move = lambda src, dst: moves.append(src) or move(src, dst)
    again = [clone(r) for r in requests]
    eager.run(requests)
    overlapped.run(again)
    for r, r0 in zip(again, requests):
        assert (r.tokens, r.finish_reason, r.stop_offset) == (
            r0.tokens,
            r0.finish_reason,
            r0.stop_offset,
        )
        torch.testing.assert_close(r.token_logprobs, r0.token_logprobs, **LOGIT_TOL)
        assert [[t for t, _ in alt] for alt in r.alternatives] == [
            [t for t, _ in alt] for alt in r0.alternatives
        ]
    assert overlapped.launched is None and not overlapped.active
    assert moves  # requests moved down to free slots while a step for them was in flight
    # The first prompts' tokens are applied (prefill), then the first decode step is launched,
    # and the second before the host reads the first one's tokens.
    assert events[:4] == ["apply", "launch", "launch", "apply"]


def test_overlapped_decode_drops_a_cancelled_request_and_goes_on():
    torch.manual_seed(0)
    model = build("hybrid")
    engine = Engine(model, TOKENIZER, slots=2, cuda_graphs=True, overlap=True)
    keep, drop = (Request(prompt=p, max_new_tokens=10, stop_at_eod=False) for p in prompts(4, 6))
    engine.add(keep), engine.add(drop)
    for _ in range(3):
        engine.step()
    drop.cancel()
    while engine.has_work():
        engine.step()
    assert drop.finish_reason == "cancelled" and len(drop.tokens) < 10
    reference = Engine(model, TOKENIZER, slots=1, cuda_graphs=False).run([clone(keep)])[0]
    assert keep.tokens == reference.tokens


def test_static_attention_reads_only_each_rows_prefix():
    """Keys past a row's position, inside the span, change nothing; the new key lands at the
    row's position; a wider span gives the same output."""
    torch.manual_seed(0)
    model = build("transformer", seq_length=64)
    attn = model.layers[0].mixer
    x = torch.randn(3, 1, model.cfg.hidden_size, dtype=torch.float64)
    lengths = torch.tensor([3, 17, 0])
    outs = []
    for span, garbage in ((32, 0.0), (64, 0.0), (32, 100.0)):
        cache = attn.allocate_state(3, 64, torch.device("cpu"), torch.float64)
        torch.manual_seed(1)
        cache.k.normal_(), cache.v.normal_()
        for r, n in enumerate(lengths.tolist()):  # past the row's position: not to be read
            cache.k[r, :, n + 1 :] += garbage
            cache.v[r, :, n + 1 :] -= garbage
        static = KVCache(cache.k, cache.v, lengths=lengths, span=span)
        outs.append(attn(x, static))
        assert torch.equal(static.lengths, lengths)  # read only: the engine advances it
    ragged_cache = attn.allocate_state(3, 64, torch.device("cpu"), torch.float64)
    torch.manual_seed(1)
    ragged_cache.k.normal_(), ragged_cache.v.normal_()
    ragged = attn(x, KVCache(ragged_cache.k, ragged_cache.v, lengths=lengths))
    for out in outs:
        torch.testing.assert_close(out, ragged, **LOGIT_TOL)
    torch.testing.assert_close(
        cache.k[[0, 1, 2], :, lengths], ragged_cache.k[[0, 1, 2], :, lengths]
    )
    with pytest.raises(RuntimeError, match="one token per row"):
        attn(x, KVCache(cache.k, cache.v, lengths=lengths, span=65))


@pytest.mark.parametrize(
    "needed, max_len, span",
    [
        (1, 100_000, 256),
        (256, 100_000, 256),
        (257, 100_000, 512),
        (4097, 100_000, 4608),
        (32768, 100_000, 32768),
        (32769, 100_000, 36864),
        (40, 64, 64),  # never past the cache
        (64, 64, 64),
    ],
)
def test_span_bucket(needed, max_len, span):
    assert span_bucket(needed, max_len) == span


def test_span_buckets_bound_the_waste_and_the_graph_count():
    spans = [span_bucket(n, 1 << 20) for n in range(1, 65537)]
    assert all(s >= n for n, s in enumerate(spans, 1))
    assert all((s - n) / n <= 1 / 8 for n, s in enumerate(spans, 1) if n > 2048)
    assert len({s for s in spans[4096:32768]}) == 24
    for bad in (0, 65):
        with pytest.raises(ValueError, match="cache"):
            span_bucket(bad, 64)


@pytest.mark.parametrize(
    ("slots", "sizes", "buckets"),
    [
        (64, None, [1, 2, 4, 8, 16, 32, 64]),
        (3, None, [1, 2, 3]),
        (1, None, [1]),
        (8, [5, 2], [2, 5, 8]),
    ],
)
def test_batch_buckets(slots, sizes, buckets):
    assert cuda_graph.batch_buckets(slots, sizes) == buckets


@pytest.mark.parametrize("sizes", [[0], [9]])
def test_batch_buckets_beyond_the_slots_are_refused(sizes):
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        cuda_graph.batch_buckets(8, sizes)


def test_warm_up_runs_every_bucket_and_changes_no_answer():
    """Every batch bucket at every span up to the context asked for, before any request (on a
    GPU each is recorded then); the free rows it steps hold garbage anyway."""
    torch.manual_seed(0)
    model = build("hybrid", seq_length=600)
    requests = workload()
    warm = Engine(model, TOKENIZER, slots=3, cuda_graphs=True)
    shapes = []
    step = warm.decoder._step
    warm.decoder._step = lambda rows, span: shapes.append((rows, span)) or step(rows, span)
    assert warm.warm_up(context=300) == 6
    # Then the warm-up requests' one decode step, their three rows together.
    assert shapes == [(1, 256), (2, 256), (3, 256), (1, 512), (2, 512), (3, 512), (3, 256)]
    cold = Engine(model, TOKENIZER, slots=3, cuda_graphs=True)
    again = [clone(r) for r in requests]
    warm.run(requests), cold.run(again)
    assert [r.tokens for r in requests] == [r.tokens for r in again]


def test_engine_asks_for_the_longest_rows_span(monkeypatch):
    seen = []
    monkeypatch.setattr(
        cuda_graph, "span_bucket", lambda needed, max_len: seen.append(needed) or max_len
    )
    model = build("hybrid")
    requests = [Request(prompt=p, max_new_tokens=3) for p in prompts(4, 9)]
    Engine(model, TOKENIZER, slots=2, cuda_graphs=True).run(requests)
    # Two decode steps (the first token comes from the prefill) feed positions 4, 5 (first row)
    # and 9, 10 (second): the span covers the longest row's position + 1.
    assert seen == [10, 11]


# Torch versions of mamba-ssm's and causal-conv1d's documented decode contracts
# (selective_state_update_ref, causal_conv1d_update_ref), to check the arguments we pass.
def selective_state_update_ref(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False
):
    assert z is None and state.dim() == 4 and A.shape == state.shape[1:]
    b, h, p, n = state.shape
    assert x.shape == dt.shape == (b, h, p) and D.shape == dt_bias.shape == (h, p)
    assert B.shape == C.shape and B.shape[0] == b and B.shape[2] == n
    dt = dt.float() + dt_bias.float()
    dt = F.softplus(dt) if dt_softplus else dt
    Bh = B.repeat_interleave(h // B.size(1), dim=1).float()
    Ch = C.repeat_interleave(h // C.size(1), dim=1).float()
    state.copy_(state * torch.exp(dt[..., None] * A) + (dt * x.float())[..., None] * Bh[:, :, None])
    return (torch.einsum("bhpn,bhn->bhp", state, Ch) + x.float() * D.float()).to(x.dtype)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    assert x.dim() == 2 and conv_state.shape[:2] == x.shape and weight.shape[0] == x.size(1)
    conv_state.copy_(torch.cat([conv_state[..., 1:], x[..., None]], -1))
    out = (conv_state * weight).sum(-1) + bias
    return F.silu(out) if activation == "silu" else out


def gated_rmsnorm_ref(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    assert bias is None and not norm_before_gate and x.shape == z.shape
    g = (x.float() * F.silu(z.float())).unflatten(-1, (-1, group_size))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.flatten(-2) * weight.float()).to(x.dtype)


def test_step_through_the_kernel_contracts_equals_the_torch_step(monkeypatch):
    """The kernel path of Mamba2Mixer.step passes arguments that the kernels' reference
    implementations turn into exactly the torch step's result."""
    torch.manual_seed(0)
    mixer = Mamba2Mixer(64, d_state=16, head_dim=16, num_groups=2).double()
    u = torch.randn(3, 1, 64, dtype=torch.float64)
    states = [mixer.allocate_state(3, torch.device("cpu"), torch.float64) for _ in range(2)]
    for s in states:
        torch.manual_seed(1)
        s.conv.normal_(), s.ssm.normal_()
    expected = mixer.step(u, states[0])
    used = []

    def kernels(m, x):
        used.append(m)
        return DecodeKernels(
            selective_state_update_ref, causal_conv1d_update_ref, gated_rmsnorm_ref
        )

    monkeypatch.setattr(mamba2, "decode_kernels", kernels)
    got = mixer.step(u, states[1])
    assert used == [mixer]
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(states[1].ssm, states[0].ssm)
    torch.testing.assert_close(states[1].conv, states[0].conv)


def test_decode_kernels_fall_back_to_torch_on_the_cpu():
    u = torch.zeros(1, 1, 64)
    for ssd in (ssd_chunked, ssd_mamba_ssm):
        mixer = Mamba2Mixer(64, d_state=16, head_dim=16, num_groups=2, ssd=ssd)
        assert decode_kernels(mixer, u) == (None, None, None)


@pytest.mark.skipif(not mamba_ssm_available(), reason="needs CUDA and mamba-ssm")
def test_kernel_step_equals_torch_step_on_gpu():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(256, d_state=64, head_dim=32, num_groups=2, ssd=ssd_mamba_ssm).cuda()
    reference = Mamba2Mixer(256, d_state=64, head_dim=32, num_groups=2).cuda()
    reference.load_state_dict(mixer.state_dict())
    assert None not in decode_kernels(mixer, torch.zeros(1, device="cuda"))
    states = [mixer.allocate_state(4, torch.device("cuda"), torch.float32) for _ in range(2)]
    for s in states:
        torch.manual_seed(1)
        s.conv.normal_(), s.ssm.normal_()
    for _ in range(3):
        u = torch.randn(4, 1, 256, device="cuda")
        torch.testing.assert_close(mixer.step(u, states[0]), reference.step(u, states[1]))
    torch.testing.assert_close(states[0].ssm, states[1].ssm)
    torch.testing.assert_close(states[0].conv, states[1].conv)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs and mamba-ssm's kernels need a CUDA device")
@pytest.mark.parametrize("case", sorted(MODELS))
def test_cuda_graph_engine_equals_eager_engine_on_gpu(case):
    model = build(case).float().cuda()
    requests = workload()
    eager = Engine(model, TOKENIZER, slots=3, cuda_graphs=False)
    graphs = Engine(model, TOKENIZER, slots=3, overlap=False)  # record_decodes sees its steps
    assert graphs.decoder is not None and graphs.decoder.cuda_graphs
    eager_logits, graph_logits = record_decodes(eager), record_decodes(graphs)
    again = [clone(r) for r in requests]
    eager.run(requests)
    graphs.run(again)
    assert graphs.decoder.error is None and graphs.decoder.graphs  # recorded, then replayed
    assert graph_logits and len(graph_logits) == len(eager_logits)
    for a, b in zip(graph_logits, eager_logits):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("case", sorted(MODELS))
def test_warmed_bucket_graphs_serve_without_recording_and_equal_all_slot_graphs(case):
    """warm_up records a graph for every batch bucket; requests joining and leaving then
    replay them (nothing recorded while serving), with the logits of graphs over all slots."""
    model = build(case).float().cuda()
    requests = workload()
    # Without overlap: record_decodes sees each step's logits.
    buckets = Engine(model, TOKENIZER, slots=3, overlap=False)
    every_slot = Engine(model, TOKENIZER, slots=3, overlap=False, decode_buckets=[3])
    assert buckets.warm_up() == 3 and set(buckets.decoder.graphs) == {(1, 64), (2, 64), (3, 64)}
    bucket_logits, slot_logits = record_decodes(buckets), record_decodes(every_slot)
    again = [clone(r) for r in requests]
    buckets.run(requests)
    every_slot.run(again)
    assert buckets.decoder.error is None and len(buckets.decoder.graphs) == 3
    assert [r.tokens for r in requests] == [r.tokens for r in again]
    assert bucket_logits and len(bucket_logits) == len(slot_logits)
    for a, b in zip(bucket_logits, slot_logits):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_decode_steps_follow_in_place_changes_of_A_log():
    """A = -exp(A_log) is kept between decode steps: loading new weights in place must still
    change the next step exactly as a mixer built with those weights."""
    torch.manual_seed(0)
    kept, fresh = (Mamba2Mixer(32, d_state=8, head_dim=8, num_groups=2).double() for _ in "ab")
    fresh.load_state_dict(kept.state_dict())
    u = torch.randn(2, 1, 32, dtype=torch.float64)
    states = [m.allocate_state(2, torch.device("cpu"), torch.float64) for m in (kept, fresh)]
    for s in states:
        torch.manual_seed(1)
        s.conv.normal_(), s.ssm.normal_()
    with torch.no_grad():
        kept.step(u, states[0]), fresh.step(u, states[1])  # the first step keeps A
        new = kept.A_log + 0.5
        kept.A_log.copy_(new)  # in place, as load_state_dict does
        fresh = Mamba2Mixer(32, d_state=8, head_dim=8, num_groups=2).double()
        fresh.load_state_dict(kept.state_dict())
        torch.testing.assert_close(kept.step(u, states[0]), fresh.step(u, states[1]))
        assert torch.equal(kept.decode_A(), -torch.exp(new.float()))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs and asynchronous copies need a CUDA device")
@pytest.mark.parametrize("case", sorted(MODELS))
def test_overlapped_graph_engine_equals_the_graph_engine_on_gpu(case):
    """The same graphs replayed with the inputs fed on the device, the copies to the host
    asynchronous: the same tokens and logprobs (a step launched ahead may attend over a longer
    masked span, which rounds differently)."""
    model = build(case).float().cuda()
    requests = workload()
    plain = Engine(model, TOKENIZER, slots=3, overlap=False)
    overlapped = Engine(model, TOKENIZER, slots=3)  # on by default with CUDA graphs
    assert overlapped.overlap and not plain.overlap
    again = [clone(r) for r in requests]
    plain.run(requests)
    overlapped.run(again)
    assert overlapped.decoder.error is None and overlapped.decoder.graphs
    for r, r0 in zip(again, requests):
        assert r.tokens == r0.tokens
        torch.testing.assert_close(r.token_logprobs, r0.token_logprobs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("below", [0, 10**9], ids=["sdpa", "matmul"])
def test_decode_attention_both_ways_equal_the_definition(monkeypatch, below):
    """Rows at different lengths over one span, 4 queries per group, in float64."""
    monkeypatch.setattr(attention, "MATMUL_ATTENTION_BELOW", below)
    g = torch.Generator().manual_seed(0)
    b, groups, n, span, d = 3, 2, 4, 40, 8
    q, k, v = (
        torch.randn(b, groups, m, d, generator=g, dtype=torch.float64) for m in (n, span, span)
    )
    lengths = torch.tensor([1, 17, 40])
    mask = (torch.arange(span) < lengths[:, None])[:, None, None, :]
    got = attention.decode_attention(q, k, v, mask)
    for r in range(b):
        s = q[r] @ k[r, :, : lengths[r]].transpose(-1, -2) / d**0.5
        want = s.softmax(-1) @ v[r, :, : lengths[r]]
        torch.testing.assert_close(got[r], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_bf16_ssm_state_decodes_close_to_the_fp32_state(static):
    """ssm_state_dtype=bfloat16: the slots' recurrent states are kept in bf16 (prefill still in
    fp32); decode logits stay within bf16 rounding of the fp32-state engine's."""
    torch.manual_seed(0)
    model = build("hybrid").float()
    requests = [Request(prompt=p, max_new_tokens=4, stop_at_eod=False) for p in prompts(5, 9)]
    exact = Engine(model, TOKENIZER, slots=2, cuda_graphs=static)
    rounded = Engine(model, TOKENIZER, slots=2, cuda_graphs=static, ssm_state_dtype=torch.bfloat16)
    ssm = [s.ssm for s in rounded.states if isinstance(s, mamba2.MambaState)]
    assert ssm and all(t.dtype == torch.bfloat16 for t in ssm)
    want, got = record_decodes(exact), record_decodes(rounded)
    exact.run(requests)
    rounded.run([clone(r) for r in requests])
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # seen: 7e-6, logits ~0.1
    assert not torch.equal(got[-1], want[-1])  # the states did round


def test_warm_up_covers_every_span_so_serving_records_nothing():
    """By default warm_up steps every batch bucket at every attention span up to max_len:
    requests of any length afterwards run only shapes it already ran (on a GPU: no graph is
    recorded after a server says ready)."""
    torch.manual_seed(0)
    model = build("hybrid", seq_length=600)
    if CUDA:
        model = model.float().cuda()
    engine = Engine(model, TOKENIZER, slots=3, cuda_graphs=True)
    shapes = []
    step = engine.decoder._step
    engine.decoder._step = lambda rows, span: shapes.append((rows, span)) or step(rows, span)
    assert engine.warm_up() == 9  # 3 batch buckets x spans 256, 512, 600
    warmed, graphs = set(shapes), len(engine.decoder.graphs)
    assert {span for _, span in warmed} == {256, 512, 600}
    shapes.clear()
    requests = [
        Request(prompt=p, max_new_tokens=n, stop_at_eod=False)
        for p, n in zip(prompts(3, 250, 560, 40), (12, 30, 20, 6))
    ]
    engine.run(requests)
    assert all(r.finish_reason == "length" for r in requests)
    assert set(shapes) <= warmed and len(engine.decoder.graphs) == graphs
