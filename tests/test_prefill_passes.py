"""Prompts admitted together are prefilled in a few passes at a few shapes: rows padded to a
power of two, positions to a piece length (16, 32, ... up to prefill_chunk), the padding masked
so that it leaves each row's state as it was. Counted, not timed: passes per admission, and the
pass shapes after warm-up all seen during warm-up (GPU kernels specialise on shapes, so a shape
first seen while serving is compiled or planned then). Real engine, tiny models, float64."""

import random

import pytest
import torch

from tests.test_engine import (  # noqa: F401 (one_thread: an autouse fixture)
    MODELS,
    TOKENIZER,
    build,
    one_thread,
    prompts,
)
from tests.test_generate import naive_greedy
from toolkit.inference.engine import Engine, Request, piece_length, row_bucket


def record_passes(engine: Engine) -> list[tuple[int, int, bool]]:
    """(rows, positions, fresh) of every prefill pass through the model, appended as they run
    (decode steps, one position per row, are left out)."""
    passes: list[tuple[int, int, bool]] = []
    hidden = engine.model.hidden

    def spy(tokens, states=None):
        if states is not None and tokens.size(1) > 1:
            first = next(s for s in states if s is not None)
            seen = first.seen if hasattr(first, "seen") else first.length
            passes.append((tokens.size(0), tokens.size(1), seen == 0))
        return hidden(tokens, states)

    engine.model.hidden = spy
    return passes


def test_piece_and_row_buckets():
    assert [piece_length(n, 2048) for n in (1, 15, 16, 17, 33, 1000, 2048)] == [
        16,
        16,
        16,
        32,
        64,
        1024,
        2048,
    ]
    assert [piece_length(n, 100) for n in (64, 65, 100)] == [64, 100, 100]
    assert [piece_length(n, 5) for n in (1, 5)] == [5, 5]
    assert [row_bucket(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]


def test_64_simultaneous_prompts_take_four_passes_and_one_step():
    """64 prompts of 1 to 64 tokens, queued at once: one step gives each its first token, in 4
    prefill passes (one per 16 positions; the old prefill ran one per distinct length, 64)."""
    model = build(seq_length=128)
    engine = Engine(model, TOKENIZER, slots=64, max_len=128)
    torch.manual_seed(1)
    requests = [
        Request(prompt=p, max_new_tokens=2, stop_at_eod=False) for p in prompts(*range(1, 65))
    ]
    random.Random(0).shuffle(requests)
    for r in requests:
        engine.add(r)
    engine.step()
    assert engine.stats["prefill_passes"] == 4
    assert all(r.first_token_step - r.queued_step == 1 for r in requests)
    assert engine.stats["first_token_steps"] == engine.stats["first_tokens"] == 64


@pytest.mark.parametrize("case", sorted(MODELS))
def test_padded_passes_give_the_full_recompute(case):
    """Prompts that end inside a padded pass (their states must be left as they were by the
    padding, and by the passes that run past them for the rows of their power of two), prompts
    that go on into later passes, and one in pieces of prefill_chunk: greedy continuations equal
    recomputing the whole sequence."""
    model = build(case, seq_length=128)
    torch.manual_seed(2)
    requests = [
        Request(prompt=p, max_new_tokens=5, stop_at_eod=False)
        for p in prompts(3, 40, 17, 1, 16, 33, 90, 5, 2)
    ]
    engine = Engine(model, TOKENIZER, slots=9, max_len=128, prefill_chunk=32)
    passes = record_passes(engine)
    engine.run(requests)
    # 9 rows padded to 16; the 4 past 16 positions; at 32 the 3 past it and the 17-token
    # prompt's row (4 rows: it is padding there); the 90-token prompt alone, in pieces of 32.
    assert passes[:5] == [(16, 16, True), (4, 16, False), (4, 16, False), (1, 32, False)] + [
        (1, 16, False)
    ]
    for r in requests:
        expected = naive_greedy(model, torch.tensor([r.prompt]), len(r.tokens))
        assert r.tokens == expected[0, len(r.prompt) :].tolist()


def test_scored_prompts_in_padded_passes_get_every_logprob():
    model = build(seq_length=128)
    torch.manual_seed(3)
    scored = [
        Request(prompt=p, max_new_tokens=0, score_prompt=True, logprobs=True)
        for p in prompts(20, 3, 45)
    ]
    Engine(model, TOKENIZER, slots=2, max_len=128, prefill_chunk=32).run(scored)
    for r in scored:
        logits = model(torch.tensor([r.prompt]))[0, :-1, : model.vocab_size].log_softmax(-1)
        expected = logits.gather(-1, torch.tensor(r.prompt[1:])[:, None]).squeeze(-1)
        assert len(r.prompt_logprobs) == len(r.prompt) - 1
        assert torch.allclose(torch.tensor(r.prompt_logprobs).double(), expected, atol=1e-5)


def test_warm_up_runs_every_prefill_shape_that_serving_runs():
    """After a warm-up with `prefill`, admissions of any mix of prompts (fresh and continuing
    passes, a prompt over the step's budget in pieces) run only shapes the warm-up ran."""
    model = build(seq_length=256)
    engine = Engine(model, TOKENIZER, slots=8, max_len=256, max_prefill_tokens=96, prefill_chunk=64)
    passes = record_passes(engine)
    engine.warm_up(prefill=True, requests=False)
    warmed = set(passes)
    assert {(rows, piece) for rows, piece, _ in warmed} == set(engine.prefill_shapes())
    assert len(warmed) == 2 * len(engine.prefill_shapes())  # fresh and continuing each
    del passes[:]
    rng = random.Random(0)
    torch.manual_seed(4)
    for _ in range(12):
        lengths = [rng.choice([1, 2, 7, 16, 17, 31, 40, 64, 65, 90, 150]) for _ in range(9)]
        for p in prompts(*lengths):
            engine.add(Request(prompt=p, max_new_tokens=rng.randint(0, 3), stop_at_eod=False))
        while engine.has_work():
            engine.step()
    served = set(passes)
    assert len(served) > 6  # many kinds of admission ran
    assert served <= warmed, served - warmed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU kernels need a CUDA device")
def test_padded_passes_on_the_gpu_kernels_give_the_full_forward():
    """The same on a GPU, where the passes run mamba-ssm's chunked scan (dt zeroed on the
    padding) and cuDNN's conv, and the full forward the fused training op: the logprob of every
    generated token (greedy) within fp32 rounding of the full forward's."""
    from pathlib import Path

    from toolkit.build import build_model
    from toolkit.config import load_recipe

    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes/tiny_hybrid.toml", [])
    torch.manual_seed(5)
    model = build_model(recipe, TOKENIZER).cuda().eval()
    engine = Engine(model, TOKENIZER, slots=9, max_len=256, prefill_chunk=64)
    engine.warm_up(32)
    requests = [
        Request(prompt=p, max_new_tokens=6, stop_at_eod=False, logprobs=True)
        for p in prompts(3, 100, 17, 1, 16, 33, 200, 5, 2)
    ]
    engine.run(requests)
    for r in requests:
        with torch.no_grad():
            logits = model(torch.tensor([r.prompt + r.tokens], device="cuda"))[0].float()
        lp = logits[len(r.prompt) - 1 : -1, : model.vocab_size].log_softmax(-1)
        expected = lp.gather(-1, torch.tensor(r.tokens, device="cuda")[:, None]).squeeze(-1)
        got = torch.tensor(r.token_logprobs, device="cuda")
        assert torch.allclose(got, expected, atol=2e-3), (len(r.prompt), got, expected)


def admission_ops(prompt_count: int) -> int:
    """Torch ops of the engine step that prefills, seats and samples `prompt_count` greedy
    prompts of one length (one pass each)."""
    engine = Engine(build(), TOKENIZER, slots=32)
    torch.manual_seed(6)
    for p in prompts(*[9] * prompt_count):
        engine.add(Request(prompt=p, max_new_tokens=3, stop_at_eod=False))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.step()
    assert engine.stats["prefill_passes"] == 1 and len(engine.active) == prompt_count
    return sum(e.count for e in prof.key_averages())


def test_admission_runs_as_many_ops_for_32_prompts_as_for_2():
    """Seating the prefilled rows in their slots copies all of them at once, a few ops per layer:
    copied one request at a time (the old code), 64 requests admitted together on the 8B took
    thousands of small kernels."""
    assert admission_ops(32) == admission_ops(2)
