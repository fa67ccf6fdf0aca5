"""The sampler's fast paths: the exact filtered distribution, the full sort's picks where they
rank, one request's draws whatever the batch, and logprobs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.inference.request import Request
from toolkit.inference.sampling import Rows, RowsCache, draw, pick

# (temperature, top_k, top_p): greedy, plain, top-k, top-k then top-p, top-p alone (peaked:
# inside the candidates; flat: past them, sorted in full), top-k at the vocabulary (off).
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


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([4.0, 1.0, 2.0, 3.0, 4.0, 3.0, 0.3, 1.0])[:n, None]
    # Row 5: a nucleus of ~18 tokens, 64 candidates hold ~70% of the mass; row 6 flat.
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
    """Every kind of row in one batch, 6000 draws each: each token's frequency lies within 5
    standard deviations of its exact probability (plus 1/n), and no token outside the
    filtered support is ever drawn."""
    n = 6000
    logits = logits_for(len(SETTINGS))
    settings = SETTINGS[1:]  # sampled rows (greedy below)
    batch = logits[1:].repeat_interleave(n, 0)
    rows = rows_of([s for s in settings for _ in range(n)])
    uniform = torch.rand(batch.size(0), generator=torch.Generator().manual_seed(1))
    tokens, _, _, wide = draw(batch, rows, uniform, nucleus_candidates=64)
    assert wide  # the flat row's nucleus reaches past 64 candidates: sorted in full
    for i, setting in enumerate(settings):
        exact = filtered_softmax(logits[1 + i], setting)
        counts = torch.bincount(tokens[i * n : (i + 1) * n], minlength=VOCAB).double()
        assert counts[exact == 0].sum() == 0, setting
        freq = counts / n
        bound = 5 * (exact * (1 - exact) / n).sqrt() + 1 / n
        assert ((freq - exact).abs() <= bound).all(), setting
    greedy = draw(logits[:1], rows_of(SETTINGS[:1]), torch.rand(1))[0]
    assert greedy.item() == logits[0].argmax().item()


@pytest.mark.parametrize("candidates", [64, 1024])
def test_ranked_paths_pick_as_the_full_sort(candidates):
    """Top-k (torch.topk of the largest k), top-k then top-p, and top-p alone (within its
    candidates or sorted in full) pick the same token as a full sort for the same draw; the
    greedy row its argmax. Rows without top-k or top-p draw over the vocabulary's own order
    (the same distribution, another token per draw)."""
    logits = logits_for(len(SETTINGS), seed=2).repeat(8, 1)
    settings = SETTINGS * 8
    t, k, p = (torch.tensor(c) for c in zip(*settings))
    uniform = torch.rand(len(settings), generator=torch.Generator().manual_seed(3))
    tokens = draw(logits, rows_of(settings), uniform, nucleus_candidates=candidates)[0]
    expected = full_sort(logits, torch.where(t > 0, t, 1.0), k, p, uniform)[0]
    ranked = torch.tensor([(0 < kk < VOCAB or 0 < pp < 1) for _, kk, pp in settings])
    assert torch.equal(tokens[ranked], expected[ranked])
    assert torch.equal(tokens[t == 0], logits[t == 0].argmax(-1))


def test_a_row_draws_the_same_token_in_any_batch():
    """A row's token depends on its own logits, settings and draw: alone, or among rows that
    change the paths taken (candidates' count, full sorts, the whole-vocabulary pass)."""
    logits = logits_for(len(SETTINGS), seed=4)
    uniform = torch.rand(len(SETTINGS), generator=torch.Generator().manual_seed(5))
    together = draw(logits, rows_of(SETTINGS), uniform, nucleus_candidates=64)[0]
    for i, s in enumerate(SETTINGS):
        alone = draw(logits[i : i + 1], rows_of([s]), uniform[i : i + 1], 64)[0]
        assert alone.item() == together[i].item(), s


@pytest.mark.parametrize("u", [0.0, 1 - 2**-24])
def test_extreme_draws_never_land_on_impossible_tokens(u):
    """Draws of 0 and just below 1 land on tokens of positive probability (the first and last
    tokens here have none, as the vocabulary's padding), on every path."""
    logits = logits_for(len(SETTINGS), seed=6)
    logits[:, :100] = logits[:, -100:] = -torch.inf
    uniform = torch.full((len(SETTINGS),), u)
    tokens = draw(logits, rows_of(SETTINGS), uniform, nucleus_candidates=64)[0]
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
