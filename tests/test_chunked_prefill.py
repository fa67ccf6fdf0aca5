"""A prompt longer than a step's prefill budget is admitted over several engine steps, so the
running requests keep decoding one token per step meanwhile; its answer is the one it gets
admitted in one step, and theirs is the one they get without it. Real engine, tiny models,
float64 (greedy picks must not flip between batched and unbatched rounding)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_engine import (  # noqa: F401 (one_thread: an autouse fixture)
    MODELS,
    TOKENIZER,
    alone,
    build,
    clone,
    one_thread,
    prompts,
)
from toolkit.build import model_from_checkpoint
from toolkit.distributed import free_port
from toolkit.inference import tp_serving
from toolkit.inference.engine import Engine, Request

BUDGET, CHUNK = 8, 4  # prompt positions per step; positions per forward pass


def running_requests() -> list[Request]:
    """Two streams decoding while the long prompt arrives: greedy and seeded sampling."""
    return [
        Request(prompt=prompts(5)[0], max_new_tokens=40, stop_at_eod=False),
        Request(
            prompt=prompts(3)[0],
            max_new_tokens=40,
            temperature=0.9,
            seed=4,
            logprobs=True,
            stop_at_eod=False,
        ),
    ]


def long_request(length: int = 37) -> Request:
    return Request(
        prompt=prompts(length)[0],
        max_new_tokens=6,
        stop_at_eod=False,
        logprobs=True,
        score_prompt=True,
    )


def count_positions(engine: Engine) -> list[int]:
    """Positions (tokens over rows) each call of the model runs, appended as they run."""
    calls: list[int] = []
    hidden = engine.model.hidden

    def spy(tokens, states=None):
        calls.append(tokens.numel())
        return hidden(tokens, states)

    engine.model.hidden = spy
    return calls


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-decode+overlap"])
def test_running_streams_get_a_token_every_step_while_a_long_prompt_is_admitted(static):
    """Each step runs the running rows' decode plus at most BUDGET prompt positions; the long
    prompt's first token comes after its last piece, ceil(37 / 8) = 5 steps after it arrived.
    With the static decoder (CUDA graphs on a GPU, eager here) and the step launched ahead."""
    model = build(seq_length=96)
    engine = Engine(
        model,
        TOKENIZER,
        slots=3,
        max_prefill_tokens=BUDGET,
        prefill_chunk=CHUNK,
        cuda_graphs=static,
        overlap=static,
    )
    running = running_requests()
    for r in running:
        engine.add(r)
    for _ in range(3):
        engine.step()
    long = long_request()
    engine.add(long)
    positions = count_positions(engine)
    steps = 0
    while not long.tokens:
        before = [len(r.tokens) for r in running]
        del positions[:]
        engine.step()
        steps += 1
        assert [len(r.tokens) for r in running] == [n + 1 for n in before], steps
        # The decode covers at most every slot (its bucket), one position each.
        assert sum(positions) <= BUDGET + engine.slots, (steps, positions)
    assert steps == 5 and len(long.tokens) == 1
    engine.run([])
    assert all(r.done and len(r.tokens) == r.max_new_tokens for r in [*running, long])


@pytest.mark.parametrize("case", sorted(MODELS))
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-decode+overlap"])
def test_long_prompt_over_several_steps_answers_as_admitted_in_one(case, static):
    """The long prompt's tokens, logprobs and prompt logprobs equal those it gets admitted in
    one step; the running streams' equal theirs without the newcomer. Queued short prompts
    share a step's budget with the long one's first and last pieces."""
    model = build(case, seq_length=96)

    def serve(budget: int) -> tuple[list[Request], int]:
        """The requests run, and the steps the long one took to its first token."""
        engine = Engine(
            model,
            TOKENIZER,
            slots=4,
            max_prefill_tokens=budget,
            prefill_chunk=CHUNK,
            cuda_graphs=static,
            overlap=static,
        )
        running = [clone(r) for r in RUNNING]
        for r in running:
            engine.add(r)
        for _ in range(3):
            engine.step()
        newcomers = [clone(r) for r in NEWCOMERS]
        for r in newcomers:
            engine.add(r)
        steps = 0
        while not newcomers[1].tokens:
            engine.step()
            steps += 1
        engine.run([])
        return running + newcomers, steps

    RUNNING = running_requests()
    # The short one takes 3 of a step's 8 positions, the long one (35) starts with the 5 left
    # and ends 6 into its 5th step; the last short prompt is admitted in that step's 2 left.
    NEWCOMERS = [
        Request(prompt=prompts(3)[0], max_new_tokens=5),
        long_request(35),
        Request(prompt=prompts(2)[0], max_new_tokens=5, temperature=1.0, seed=9),
    ]
    (chunked, steps), (whole, one) = serve(BUDGET), serve(10_000)
    assert (steps, one) == (5, 1)
    for got, expected in zip(chunked, whole, strict=True):
        assert got.tokens == expected.tokens and len(got.tokens) == got.max_new_tokens
        torch.testing.assert_close(got.token_logprobs, expected.token_logprobs)
        torch.testing.assert_close(got.prompt_logprobs, expected.prompt_logprobs)
    assert len(chunked[3].prompt_logprobs) == 34
    for got, r in zip(chunked, RUNNING + NEWCOMERS):
        assert got.tokens == alone(model, r).tokens  # as if nothing else ran


def test_cancelling_a_long_prompt_mid_prefill_frees_its_slot():
    model = build(seq_length=96)
    engine = Engine(model, TOKENIZER, slots=1, max_prefill_tokens=BUDGET, prefill_chunk=CHUNK)
    long, queued = long_request(), Request(prompt=prompts(4)[0], max_new_tokens=5)
    engine.add(long)
    engine.add(queued)
    engine.step()
    engine.step()
    # Half prefilled: it holds the only slot's place, so the next request waits.
    assert not long.tokens and not long.done and list(engine.waiting) == [queued]
    long.cancel()
    engine.step()  # drops it, then admits the next request into the slot
    assert long.finish_reason == "cancelled" and long.tokens == []
    assert engine.prefilling is None and len(queued.tokens) == 1
    engine.run([])
    assert queued.tokens == alone(model, queued).tokens
    assert engine.stats["cancelled"] == 1 and engine.stats["finished"] == 1


def test_a_failed_step_finishes_the_long_prompt_in_progress():
    engine = Engine(build(seq_length=96), TOKENIZER, slots=2, max_prefill_tokens=BUDGET)
    long = long_request()
    engine.add(long)
    engine.step()
    assert not long.tokens and engine.prefilling.request is long
    failed = engine.fail_all("generation failed: out of memory")
    assert failed == [long] and long.finish_reason == "error" and not engine.has_work()


def score_only_request() -> Request:
    return Request(prompt=prompts(20)[0], max_new_tokens=0, score_prompt=True)


def test_a_long_prompt_to_score_only_takes_no_slot():
    """max_new_tokens=0 (prompt logprobs only): prefilled over steps beside a full house."""
    model = build(seq_length=96)
    engine = Engine(model, TOKENIZER, slots=1, max_prefill_tokens=BUDGET, prefill_chunk=CHUNK)
    hog = Request(prompt=prompts(3)[0], max_new_tokens=30)
    engine.add(hog)
    engine.step()
    scored = score_only_request()
    engine.add(scored)
    engine.step()
    engine.step()
    assert not scored.done and engine.prefilling is not None  # beside the running one
    engine.run([])
    expected = Engine(model, TOKENIZER, slots=1).run([clone(scored)])[0]
    assert scored.finish_reason == "length" and scored.tokens == []
    torch.testing.assert_close(scored.prompt_logprobs, expected.prompt_logprobs)


def tp_worker(rank: int, world: int, port: int, checkpoint: str) -> None:
    """One TP rank: the leader scripts the requests; every rank runs the same steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ranks = tp_serving.start(world, torch.device("cpu"), [])
    shard, _, tokenizer = model_from_checkpoint(checkpoint, env=ranks.env)
    engine = tp_serving.TPEngine(
        shard.double(),
        tokenizer,
        ranks=ranks,
        slots=3,
        max_prefill_tokens=BUDGET,
        prefill_chunk=CHUNK,
    )
    trace: list = []  # what each step left: the slots' token counts and the prefill's progress
    step = engine.step

    def traced() -> list[Request]:
        out = step()
        done = None if engine.prefilling is None else engine.prefilling.done
        trace.append(([len(r.tokens) for _, r in sorted(engine.active.items())], done))
        return out

    engine.step = traced
    if rank != 0:
        assert tp_serving.follow(engine) == 0
    else:
        torch.manual_seed(0)
        running, long, doomed = running_requests()[0], long_request(), long_request(30)
        queued = Request(prompt=prompts(4)[0], max_new_tokens=5)

        def step_all() -> None:
            engine.exchange()
            engine.step()

        engine.add(running)
        step_all()
        engine.add(long)
        engine.add(doomed)
        engine.add(queued)
        steps = 0
        while not long.tokens:
            before = len(running.tokens)
            step_all()
            steps += 1
            assert len(running.tokens) == before + 1
        assert steps == 5
        # The long one's last piece left 3 positions: the next long prompt started with them,
        # in the last free slot's place.
        assert engine.prefilling.request is doomed and list(engine.waiting) == [queued]
        step_all()
        doomed.cancel()
        step_all()  # every rank drops it (the leader's event), the queued one takes the slot
        assert doomed.finish_reason == "cancelled" and engine.prefilling is None
        assert len(queued.tokens) == 1
        while engine.has_work():
            step_all()
        engine.exchange(stop=True)
        full, _, _ = model_from_checkpoint(checkpoint)
        for r in (running, long, queued):
            assert r.tokens == alone(full.double(), r).tokens
    traces = [None] * world
    dist.all_gather_object(traces, trace, group=ranks.events)
    assert all(t == traces[0] for t in traces), "the ranks ran different steps"
    ranks.close()
    assert not dist.is_initialized()  # left to the exit, gloo's threads could abort the rank


def test_tensor_parallel_ranks_admit_a_long_prompt_over_the_same_steps(tmp_path):
    """TPEngine shares the engine's path: on two ranks (gloo) the long prompt spans 5 steps,
    the running stream gets a token at each, a cancellation mid-prefill (the leader's event)
    frees the slot on every rank, and the answers are the model's alone."""
    from tests.test_tp_serving import MODELS as TP_MODELS
    from tests.test_tp_serving import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt", TP_MODELS["hybrid"] + ["model.seq_length=96"])
    mp.spawn(tp_worker, args=(2, free_port(), str(checkpoint)), nprocs=2, join=True)
