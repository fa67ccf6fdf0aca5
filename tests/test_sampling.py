"""The sampler's fast paths: the exact filtered distribution, the full sort's picks where they
rank, top-p's nucleus without a sort against a sort's, one request's draws whatever the batch,
and logprobs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.inference import sampling
from toolkit.inference.request import Request
from toolkit.inference.sampling import Rows, RowsCache, draw, pick

# (temperature, top_k, top_p): greedy, plain, top-k, top-k then top-p, top-p alone (peaked: a
# nucleus of ~18 tokens; flat: of thousands), top-k at the vocabulary (off).
SETTINGS = [
    (0.0, 0, 0.0),
    (1.0, 0, 0.0),
    (0.7, 0, 0.0),
    (0.8, 7, 0.0),
    (1.3, 20, 0.6),
    (1.0, 0, 0.5),
    (1.0, 0, 0.97),
    (1.0, 4000, 1.0),
]
VOCAB = 4000
ROOT = Path(__file__).resolve().parents[1]


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([4.0, 1.0, 2.0, 3.0, 4.0, 3.0, 0.3, 1.0])[:n, None]
    return torch.randn(n, VOCAB, generator=g) * scale


def rows_of(settings, vocab: int = VOCAB) -> Rows:
    t, k, p = zip(*settings)
    return Rows.build(t, k, p, vocab, torch.device("cpu"))


def full_sort(logits, temperature, top_k, top_p, uniform):
    """The sampler before the fast paths: a full sort of every row, ranks in order."""
    vocab = logits.size(-1)
    scaled = logits.double() / temperature[:, None]
    ranked, order = scaled.sort(-1, descending=True)
    rank = torch.arange(vocab)
    k = torch.where(top_k > 0, top_k, vocab)
    probs = ranked.masked_fill(rank >= k[:, None], -torch.inf).softmax(-1)
    nucleus = ((top_p > 0) & (top_p < 1))[:, None]
    drop = nucleus & (probs.cumsum(-1) - probs >= top_p[:, None])
    cdf = probs.masked_fill(drop, 0.0).cumsum(-1)
    pick = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1])[:, None], right=True)
    return order.gather(-1, pick.clamp(max=vocab - 1)).squeeze(-1), probs.masked_fill(drop, 0.0)


def filtered_softmax(logits: torch.Tensor, setting) -> torch.Tensor:
    """The exact distribution a row's settings ask for, over the vocabulary's order."""
    t, k, p = setting
    probs = torch.zeros(VOCAB, dtype=torch.float64)
    _, ranked_probs = full_sort(
        logits[None], torch.tensor([t]), torch.tensor([k]), torch.tensor([p]), torch.zeros(1)
    )
    order = logits.double().argsort(descending=True)
    probs[order] = ranked_probs[0] / ranked_probs[0].sum()
    return probs


def test_empirical_distribution_is_the_filtered_softmax():
    """Every kind of row in each batch, 6000 draws each (in batches of 1000 of each kind, to
    bound the memory): each token's frequency lies within 5 standard deviations of its exact
    probability (plus 1/n), and no token outside the filtered support is ever drawn."""
    n, per_batch = 6000, 1000
    logits = logits_for(len(SETTINGS))
    settings = SETTINGS[1:]  # sampled rows (greedy below)
    batch = logits[1:].repeat(per_batch, 1)
    rows = rows_of(settings * per_batch)
    uniform = torch.rand(len(settings), n, generator=torch.Generator().manual_seed(1))
    tokens = torch.cat(
        [
            draw(batch, rows, u.T.flatten())[0].view(-1, len(settings)).T
            for u in uniform.split(per_batch, 1)
        ],
        1,
    )
    for i, setting in enumerate(settings):
        exact = filtered_softmax(logits[1 + i], setting)
        counts = torch.bincount(tokens[i], minlength=VOCAB).double()
        assert counts[exact == 0].sum() == 0, setting
        freq = counts / n
        bound = 5 * (exact * (1 - exact) / n).sqrt() + 1 / n
        assert ((freq - exact).abs() <= bound).all(), setting
    greedy = draw(logits[:1], rows_of(SETTINGS[:1]), torch.rand(1))[0]
    assert greedy.item() == logits[0].argmax().item()


def vocab_order_draw(logits, kept, temperature, uniform):
    """The inverse CDF of the integer masses floor(exp((logits - max) / T) * 2**S) over the
    `kept` tokens in the vocabulary's own order: the first token whose running mass exceeds
    floor(u * total) (exact integers, as the sampler's docstring says)."""
    x = logits.float()
    inverse = torch.tensor([1 / t for t in temperature], dtype=torch.float32)
    w = (x - x.max(-1, keepdim=True).values).mul(inverse[:, None]).exp()
    mass = (w * 2.0 ** (62 - (x.size(-1) - 1).bit_length())).long().where(kept, 0)
    cum = mass.cumsum(-1)
    target = (uniform.double() * cum[:, -1].double()).floor().long()
    target = torch.minimum(target, cum[:, -1] - 1)
    pick = torch.searchsorted(cum, target[:, None], right=True)
    return pick.squeeze(-1).clamp(max=x.size(-1) - 1)


def test_ranked_paths_pick_as_the_full_sort():
    """Top-k (torch.topk of the largest k) and top-k then top-p pick the same token as a full
    sort for the same draw; the greedy row its argmax. Top-p alone draws from the full sort's
    nucleus over the vocabulary's own order, as rows without top-k or top-p draw over the
    whole vocabulary (the same distribution, another token per draw)."""
    logits = logits_for(len(SETTINGS), seed=2).repeat(8, 1)
    settings = SETTINGS * 8
    t, k, p = (torch.tensor(c) for c in zip(*settings))
    uniform = torch.rand(len(settings), generator=torch.Generator().manual_seed(3))
    tokens = draw(logits, rows_of(settings), uniform)[0]
    expected, probs = full_sort(logits, torch.where(t > 0, t, 1.0), k, p, uniform)
    ranked = (0 < k) & (k < VOCAB)
    assert torch.equal(tokens[ranked], expected[ranked])
    assert torch.equal(tokens[t == 0], logits[t == 0].argmax(-1))
    nucleus = ~ranked & (0 < p) & (p < 1)
    order = logits.argsort(-1, descending=True)
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, probs > 0)
    alone = vocab_order_draw(logits[nucleus], kept[nucleus], t[nucleus].tolist(), uniform[nucleus])
    assert nucleus.sum() == 16 and torch.equal(tokens[nucleus], alone)


def sort_nucleus(logits: torch.Tensor, temperature, top_p) -> torch.Tensor:
    """The reference nucleus, by a full sort of each row: the smallest top set whose mass
    reaches top_p, and every token tied with its last (the module's docstring: masses exact
    integers of the float32 weights, compared in float64) -> the kept tokens [b, v]."""
    x = logits.float()
    inverse = torch.tensor([1 / t for t in temperature], dtype=torch.float32)
    w = (x - x.max(-1, keepdim=True).values).mul(inverse[:, None]).exp()
    mass = (w * 2.0 ** (62 - (x.size(-1) - 1).bit_length())).long()
    ranked, order = x.sort(dim=-1, descending=True, stable=True)
    cum = mass.gather(-1, order).cumsum(-1)
    target = torch.tensor(top_p, dtype=torch.float32).double() * cum[:, -1].double()
    last = (cum.double() >= target[:, None]).int().argmax(-1)  # the first rank reaching it
    return x >= ranked.gather(-1, last[:, None])


def nucleus_rows(dtype: torch.dtype, per_kind: int = 24, vocab: int = VOCAB) -> torch.Tensor:
    """Rows of logits of every shape a nucleus meets: peaked, flat, few distinct values (ties
    everywhere), consecutive bit patterns (a threshold one pattern off keeps another set),
    across zero with +0 and -0, and with -inf padding."""
    g = torch.Generator().manual_seed(11)
    width = 16 if dtype.itemsize == 2 else 32
    int_type = torch.int16 if width == 16 else torch.int32

    def patterns(base: int, spread: int) -> torch.Tensor:
        offsets = torch.randint(-spread, spread + 1, (per_kind, vocab), generator=g)
        return (offsets + base).to(int_type).view(dtype)

    one = torch.tensor(1.0, dtype=dtype).view(int_type).item()
    sign = -(1 << (width - 1))
    kinds = [
        torch.randn(per_kind, vocab, generator=g) * 6,
        torch.randn(per_kind, vocab, generator=g) * 0.2,
        torch.randint(-8, 3, (per_kind, vocab), generator=g) * 0.5,
        patterns(one, 3000).float(),  # around 1.0: weights of every size near 1
        patterns(one, 40).float(),  # 81 consecutive values, each some 50 times
        # The first patterns of either sign: tiny values, w = 1 for all, +0 and -0 among them.
        torch.where(
            torch.rand(per_kind, vocab, generator=g) < 0.5,
            patterns(15, 15).float(),
            -patterns(15, 15).float(),
        ),
    ]
    padded = torch.randn(per_kind, vocab, generator=g) * 3
    padded[:, torch.randperm(vocab, generator=g)[: vocab // 4]] = -torch.inf
    logits = torch.cat([*kinds, padded]).to(dtype)
    assert (logits.view(int_type) == sign).any() and (logits.view(int_type) == 0).any()
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,per_kind", [(VOCAB, 24), (1 << 16, 3)])  # 8 or 16 bits a pass
def test_nucleus_keeps_what_a_full_sort_keeps(dtype, vocab, per_kind):
    """Top-p alone, without a sort: on rows of every shape (nucleus_rows) and top_p from 1e-6
    to the largest float32 below 1, the kept tokens are exactly the full sort's (ties at the
    threshold kept), and each draw lands where the inverse CDF over those tokens, in the
    vocabulary's order, puts it. A threshold one bit pattern off keeps another set in some
    row."""
    logits = nucleus_rows(dtype, per_kind, vocab)
    b = logits.size(0)
    g = torch.Generator().manual_seed(12)
    ps = [1e-6, 0.1, 0.5, 0.9, 0.95, 0.999, 1 - 2**-24]
    top_p = [ps[i] for i in torch.randint(len(ps), (b,), generator=g)]
    temperature = [(0.5, 1.0, 1.7)[i] for i in torch.randint(3, (b,), generator=g)]
    kept = sort_nucleus(logits, temperature, top_p)
    rows = rows_of(list(zip(temperature, [0] * b, top_p)), vocab)
    x = logits.float()
    weights = (x - x.max(-1).values[:, None]).mul_(rows.inverse[:, None]).exp_()
    outside = sampling._outside(logits, weights, rows.top_p, rows.nucleus_only)
    assert torch.equal(~outside, kept)
    sizes = kept.sum(-1)
    assert sizes.min() == 1 and sizes.max() > vocab // 2  # from one token to most of them
    for u in torch.linspace(0, 1 - 2**-24, 7):
        uniform = torch.full((b,), u.item())
        expected = vocab_order_draw(logits, kept, temperature, uniform)
        assert torch.equal(draw(logits, rows, uniform)[0], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nucleus_that_reaches_top_p_exactly_stops_there(dtype):
    """Two tokens of the same weight (logits 0 and -1e-10: exp rounds both to 1) and top_p 0.5:
    the first reaches it, the second is left out; two equal logits are both kept."""
    logits = torch.full((2, VOCAB), -torch.inf)
    logits[:, :2] = torch.tensor([[0.0, -1e-10], [0.0, 0.0]])
    logits = logits.to(dtype)
    rows = rows_of([(1.0, 0, 0.5)] * 2)
    x = logits.float()
    weights = (x - x.max(-1).values[:, None]).exp_()
    assert torch.equal(weights[0, :2], torch.ones(2))
    outside = sampling._outside(logits, weights, rows.top_p, rows.nucleus_only)
    assert (~outside).nonzero().tolist() == [[0, 0], [1, 0], [1, 1]]
    tokens = [draw(logits, rows, torch.full((2,), u))[0].tolist() for u in (0.0, 0.75)]
    assert tokens == [[0, 0], [0, 1]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_reads_nothing_on_the_host_on_cuda():
    """Every path of a step's sampling (greedy, plain, top-k, top-k then top-p, top-p alone)
    runs without waiting for the device: no host sync, so the step ahead keeps the GPU busy."""
    device = torch.device("cuda")
    logits = logits_for(len(SETTINGS)).to(device, torch.bfloat16)
    rows = Rows.build(*zip(*SETTINGS), VOCAB, device)
    uniform = torch.rand(len(SETTINGS), device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        draw(logits, rows, uniform)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_row_draws_the_same_token_in_any_batch():
    """A row's token depends on its own logits, settings and draw: alone, or among rows that
    change the paths taken (top-k's candidates, the nucleus, the whole-vocabulary pass)."""
    logits = logits_for(len(SETTINGS), seed=4)
    uniform = torch.rand(len(SETTINGS), generator=torch.Generator().manual_seed(5))
    together = draw(logits, rows_of(SETTINGS), uniform)[0]
    for i, s in enumerate(SETTINGS):
        alone = draw(logits[i : i + 1], rows_of([s]), uniform[i : i + 1])[0]
        assert alone.item() == together[i].item(), s


@pytest.mark.parametrize("u", [0.0, 1 - 2**-24])
def test_extreme_draws_never_land_on_impossible_tokens(u):
    """Draws of 0 and just below 1 land on tokens of positive probability (the first and last
    tokens here have none, as the vocabulary's padding), on every path."""
    logits = logits_for(len(SETTINGS), seed=6)
    logits[:, :100] = logits[:, -100:] = -torch.inf
    uniform = torch.full((len(SETTINGS),), u)
    tokens = draw(logits, rows_of(SETTINGS), uniform)[0]
    assert ((100 <= tokens) & (tokens < VOCAB - 100)).all()


def requests_for(settings, first_seed: int = 0, **extra) -> list[Request]:
    out = []
    for i, (t, k, p) in enumerate(settings):
        r = Request(prompt=[0], temperature=t, top_k=k, top_p=p, **extra)
        r.generator = torch.Generator().manual_seed(first_seed + i)
        out.append(r)
    return out


def test_logprobs_are_the_log_softmax_whatever_the_batch():
    """Logprobs and top logprobs equal the raw logits' log_softmax, for rows that share the
    sampling pass's sum (temperature 1, no top-k) and rows that do not, in one batch; a row's
    values are the same bits alone."""
    logits = logits_for(len(SETTINGS), seed=7)
    requests = requests_for(SETTINGS, logprobs=True, top_logprobs=3)
    tokens, lp, values, ids = pick(logits, requests)
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(lp, ref.gather(-1, tokens[:, None])[:, 0])
    ref_values, ref_ids = ref.topk(3, -1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values, ref_values)
    for i, s in enumerate(SETTINGS):
        alone = pick(logits[i : i + 1], requests_for([s], i, logprobs=True, top_logprobs=3))
        assert alone[0].item() == tokens[i].item()
        assert alone[1].item() == lp[i].item() and torch.equal(alone[2][0], values[i])


def test_cached_settings_follow_the_batch():
    """The settings stay on the device while the same requests run, and are rebuilt when a
    request changes, even at the same count of rows."""
    cache = RowsCache()
    logits = logits_for(2, seed=8)
    first = requests_for([(0.0, 0, 0.0), (0.0, 0, 0.0)])
    rows = cache.get(first, VOCAB, logits.device)
    assert cache.get(first, VOCAB, logits.device) is rows and not rows.sampled
    other = requests_for([(0.0, 0, 0.0), (1.0, 1, 0.0)])  # top-k 1: the best token
    tokens = pick(logits, other, cache)[0]
    assert cache.rows is not rows and cache.rows.sampled
    assert tokens.tolist() == logits.argmax(-1).tolist()


@pytest.mark.long  # make test-long (CI runs it): decode.py in a subprocess
def test_decode_benchmark_times_each_sampling_setting_on_cpu(tmp_path):
    """benchmarks/decode.py --sampling: the same engine steps with each setting, beside greedy,
    with the overhead; a bad name is refused with exit status 2 (no timing asserted)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "decode.json"
    args = ["--recipe", str(root / "recipes/tiny_hybrid.toml"), "--contexts", "8"]
    args += ["--batches", "3", "--steps", "2", "--warmup", "1", "--device", "cpu"]
    args += ["--dtype", "float32", "--json", str(out)]
    run = [sys.executable, str(root / "benchmarks/decode.py"), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    names = "temperature,topk,topp,seeded,logprobs"
    proc = subprocess.run(
        [*run, "--sampling", names], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["sampling"] for r in rows] == ["greedy", *names.split(",")]
    assert all(r["ms_per_step"] > 0 and "overhead_vs_greedy" in r for r in rows[1:])
    assert "over greedy" in proc.stdout
    bad = subprocess.run(
        [*run, "--sampling", "topz"], capture_output=True, text=True, timeout=300, env=env
    )
    assert bad.returncode == 2 and "topz" in bad.stderr and "Traceback" not in bad.stderr


KERNEL_CHECK = """
import os, sys
import torch
from toolkit.inference import sampling
from test_sampling import SETTINGS, nucleus_rows, rows_of

assert sampling._kernels(torch.zeros(1)) is not None, "the Triton kernels are not in use"
for dtype in (torch.float32, torch.bfloat16):
    for vocab in (4000, 1 << 16):  # 8 or 16 bits a radix pass
        logits = nucleus_rows(dtype, 1, vocab)
        b = logits.size(0)
        ps = (1e-6, 0.5, 0.9, 1 - 2**-24)
        settings = [SETTINGS[i % len(SETTINGS)] for i in range(b)]  # every path in one batch
        settings += [((0.5, 1.0, 1.7)[i % 3], 0, ps[i % 4]) for i in range(b)]
        settings += [(0.8, 0, 0.0)] * b
        rows = rows_of(settings, vocab)
        batch = logits.repeat(3, 1)
        for u in (0.0, 1 - 2**-24):
            uniform = torch.full((len(settings),), u)
            got = sampling.draw(batch, rows, uniform)
            os.environ["TOOLKIT_TRITON_SAMPLING"] = "off"
            want = sampling.draw(batch, rows, uniform)
            del os.environ["TOOLKIT_TRITON_SAMPLING"]
            assert torch.equal(got[0], want[0]), (dtype, vocab, u, got[0] - want[0])
            # The totals of the rows that define them, to numpy's exp against torch's (a float32
            # ulp or so per weight: the interpreter's; on a GPU both are libdevice's).
            natural = rows.natural
            torch.testing.assert_close(got[2][natural], want[2][natural], rtol=1e-6, atol=0)
print("kernels agree")
"""


@pytest.mark.long  # make test-long (CI runs it): ~30 s under Triton's interpreter
def test_triton_kernels_draw_what_the_torch_path_draws():
    """The CUDA path's Triton kernels (run here by Triton's interpreter) give the torch path's
    tokens and totals, bit for bit, on rows of every shape and every setting in one batch,
    float32 and bfloat16 logits, 8- and 16-bit radix passes, draws at 0 and just below 1."""
    pytest.importorskip("triton")
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    out = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernels agree" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernels_draw_what_the_torch_path_draws_on_cuda(monkeypatch):
    """On the GPU itself (libdevice's exp, the same float32 as torch's): the same tokens and
    totals as the torch path, over a 256k vocabulary at batch 32."""
    pytest.importorskip("triton")
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(32, 256000, generator=g) * torch.linspace(0.2, 8, 32)[:, None]).to(
        device, torch.bfloat16
    )
    settings = [((0.7, 1.0)[i % 2], 0, (0.0, 0.9, 0.95, 0.5)[i % 4]) for i in range(32)]
    rows = Rows.build(*zip(*settings), 256000, device)
    uniform = torch.rand(32, generator=g).to(device)
    assert sampling._kernels(logits) is not None
    got = draw(logits, rows, uniform)
    monkeypatch.setenv("TOOLKIT_TRITON_SAMPLING", "off")
    want = draw(logits, rows, uniform)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])  # every row natural
