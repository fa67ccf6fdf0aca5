"""The continuous-batching engine equals a plain full-forward decode, whatever the batch."""

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_config
from tests.test_decode import CASES
from tests.test_generate import AlwaysToken, naive_greedy
from toolkit.inference.engine import Engine, Request, memory_bytes
from toolkit.model import HybridLM
from toolkit.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
MODELS = {
    "hybrid": CASES["hybrid"],
    "mamba2": CASES["mamba"],
    "transformer": CASES["attention_rope"],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine each parallel region
    waits for a free core (measured: 71 s instead of 6 s for the same reference runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(case: str = "hybrid", seq_length: int = 64) -> HybridLM:
    # float64: batched and unbatched matmuls round differently, and greedy picks must not flip.
    cfg = tiny_model_config(**MODELS[case], seq_length=seq_length)
    return HybridLM(cfg, vocab_size=TOKENIZER.vocab_size).double().eval()


def prompts(*lengths: int) -> list[list[int]]:
    return [torch.randint(0, 256, (n,)).tolist() for n in lengths]


def alone(model: HybridLM, request: Request) -> Request:
    return Engine(model, TOKENIZER, slots=1).run([clone(request)])[0]


def clone(r: Request) -> Request:
    return Request(**{f.name: getattr(r, f.name) for f in fields(r) if f.init})


@pytest.mark.parametrize("case", sorted(MODELS))
def test_batched_greedy_equals_full_recompute(case):
    """Prompts of different lengths prefilled together (long ones in pieces) and decoded
    together, with fewer slots than requests (the last ones wait for a free slot): each equals
    recomputing its whole sequence at every step."""
    model = build(case)
    requests = [
        Request(prompt=p, max_new_tokens=n, stop_at_eod=False)
        for p, n in zip(prompts(5, 12, 1, 9, 12, 3), [20, 7, 15, 11, 4, 9])
    ]
    Engine(model, TOKENIZER, slots=4, prefill_chunk=5).run(requests)  # prompts in pieces
    for r in requests:
        expected = naive_greedy(model, torch.tensor([r.prompt]), len(r.tokens))
        assert r.tokens == expected[0, len(r.prompt) :].tolist()
        assert len(r.tokens) == r.max_new_tokens and r.finish_reason == "length"


def test_sampled_batch_equals_each_request_alone():
    """Mixed settings in one batch (greedy, temperature, top-k, top-p, seeds): every request gets
    exactly what it gets alone, logprobs included."""
    model = build()
    settings = [
        dict(temperature=0.0),
        dict(temperature=1.0, seed=1),
        dict(temperature=0.7, top_k=5, seed=2),
        dict(temperature=1.3, top_p=0.9, seed=3),
        dict(temperature=1.0, seed=1),
    ]
    requests = [
        Request(
            prompt=p, max_new_tokens=12, logprobs=True, score_prompt=True, stop_at_eod=False, **s
        )
        for p, s in zip(prompts(4, 9, 2, 7, 11), settings)
    ]
    Engine(model, TOKENIZER, slots=8).run(requests)
    for r in requests:
        ref = alone(model, r)
        assert r.tokens == ref.tokens
        torch.testing.assert_close(r.token_logprobs, ref.token_logprobs)
        torch.testing.assert_close(r.prompt_logprobs, ref.prompt_logprobs)


def test_request_joining_mid_batch_gets_its_alone_output():
    model = build()
    first = Request(prompt=prompts(6)[0], max_new_tokens=30, temperature=1.0, seed=5)
    late = Request(prompt=prompts(10)[0], max_new_tokens=10, temperature=1.0, seed=6)
    engine = Engine(model, TOKENIZER, slots=2)
    engine.add(first)
    for _ in range(7):
        engine.step()
    assert len(first.tokens) == 7 and not first.done
    engine.run([late])
    assert first.tokens == alone(model, first).tokens
    assert late.tokens == alone(model, late).tokens


@pytest.mark.parametrize("case", sorted(MODELS))
def test_requests_moved_to_lower_slots_get_their_alone_output(case):
    """When a low slot frees, the highest running request moves into it (its state rows, KV
    prefix, position and next input), so a step's batch stays as small as the running set; the
    moved requests, greedy and sampled, continue as if alone."""
    model = build(case)
    # Seated in order; slot 0 finishes first (the last request moves down from slot 2), then
    # slot 1 (the fourth, seated in slot 2 meanwhile, moves down).
    requests = [
        Request(prompt=p, max_new_tokens=n, stop_at_eod=False, **extra)
        for p, n, extra in zip(
            prompts(5, 5, 5, 5),
            (2, 6, 16, 9),
            [{}, {}, dict(temperature=0.7, seed=2, logprobs=True), dict(temperature=1.0, seed=1)],
        )
    ]
    engine = Engine(model, TOKENIZER, slots=3)
    moves = []
    move = engine._move
    engine._move = lambda src, dst: moves.append((src, dst)) or move(src, dst)
    engine.run(requests)
    assert moves == [(2, 0), (2, 1)]
    for r in requests:
        ref = alone(model, r)
        assert r.tokens == ref.tokens
        torch.testing.assert_close(r.token_logprobs, ref.token_logprobs)


def test_state_memory_is_allocated_once_and_bounded():
    model = build()
    engine = Engine(model, TOKENIZER, slots=2, max_len=48)
    buffers = [
        t.data_ptr()
        for s in engine.states
        if s is not None
        for t in vars(s).values()
        if isinstance(t, torch.Tensor)
    ]
    requests = [Request(prompt=p, max_new_tokens=8) for p in prompts(3, 5, 7, 2, 4)]
    for r in requests:
        engine.add(r)
    busiest = 0
    while engine.has_work():
        engine.step()
        busiest = max(busiest, len(engine.active))
    assert busiest == 2 and all(r.done for r in requests)  # the others waited, none dropped
    assert buffers == [
        t.data_ptr()
        for s in engine.states
        if s is not None
        for t in vars(s).values()
        if isinstance(t, torch.Tensor)
    ]
    nbytes = sum(
        t.nbytes
        for s in engine.states
        if s is not None
        for t in vars(s).values()
        if isinstance(t, torch.Tensor)
    )
    assert memory_bytes(model, 2, 48) == nbytes


def test_logprobs_equal_the_full_forward():
    model = build()
    r = Request(
        prompt=prompts(9)[0],
        max_new_tokens=6,
        temperature=1.0,
        seed=0,
        logprobs=True,
        score_prompt=True,
        top_logprobs=3,
    )
    Engine(model, TOKENIZER).run([r])
    seq = torch.tensor([r.prompt + r.tokens])
    with torch.no_grad():
        lp = model(seq)[0, :-1, : model.vocab_size].log_softmax(-1)
    expected = lp.gather(-1, seq[0, 1:, None]).squeeze(-1)
    got = torch.tensor(r.prompt_logprobs + r.token_logprobs, dtype=expected.dtype)
    assert len(r.prompt_logprobs) == 8
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    values, ids = lp[8:].topk(3, dim=-1)  # the alternatives at each generated position
    assert [[t for t, _ in alt] for alt in r.alternatives] == ids.tolist()
    alternatives = torch.tensor([[v for _, v in a] for a in r.alternatives], dtype=values.dtype)
    torch.testing.assert_close(alternatives, values, rtol=1e-4, atol=1e-4)
    only_prompt = Request(prompt=r.prompt, max_new_tokens=0, score_prompt=True)
    Engine(model, TOKENIZER).run([only_prompt])
    assert only_prompt.tokens == [] and only_prompt.finish_reason == "length"
    assert only_prompt.prompt_logprobs == pytest.approx(r.prompt_logprobs)


def test_seed_decides_the_sample():
    model = build()
    p = prompts(5)[0]
    runs = [
        alone(model, Request(prompt=p, max_new_tokens=20, temperature=1.0, seed=s))
        for s in (3, 3, 4)
    ]
    assert runs[0].tokens == runs[1].tokens != runs[2].tokens


def test_stop_string_and_end_of_document():
    model = build()
    p = prompts(5)[0]
    free = alone(model, Request(prompt=p, max_new_tokens=24, stop_at_eod=False))
    text = TOKENIZER.decode(free.tokens)
    stop = text[6:8]
    stopped = alone(
        model, Request(prompt=p, max_new_tokens=24, stop=["\x00never", stop], stop_at_eod=False)
    )
    assert stopped.finish_reason == "stop" and stopped.stop_offset == text.find(stop)
    assert stopped.tokens == free.tokens[: len(stopped.tokens)]
    assert TOKENIZER.decode(stopped.tokens).endswith(stop)

    model.output_layer = AlwaysToken(model.padded_vocab_size, TOKENIZER.eod)
    eod = alone(model, Request(prompt=p, max_new_tokens=24))
    assert eod.finish_reason == "eod" and eod.tokens == [TOKENIZER.eod]
    assert len(alone(model, Request(prompt=p, max_new_tokens=5, stop_at_eod=False)).tokens) == 5


def test_cancel_frees_the_slot():
    model = build()
    engine = Engine(model, TOKENIZER, slots=1)
    hog = Request(prompt=prompts(3)[0], max_new_tokens=50)
    queued = Request(prompt=prompts(3)[0], max_new_tokens=5)
    engine.add(hog)
    engine.add(queued)
    engine.step()
    assert queued in engine.waiting
    hog.cancel()
    engine.run([])
    assert hog.finish_reason == "cancelled" and len(hog.tokens) < 50
    assert queued.finish_reason == "length" and engine.stats["cancelled"] == 1


def test_a_failed_step_finishes_every_request_with_the_error():
    """Nobody waits forever on a request the engine lost: running, being prefilled, waiting."""
    engine = Engine(build(), TOKENIZER, slots=2)
    running, newcomer, queued = (Request(prompt=[1, 2], max_new_tokens=9) for _ in range(3))
    engine.add(running)
    engine.step()
    engine.add(newcomer)
    engine.add(queued)  # no slot left for it: it waits

    def broken(requests):
        raise RuntimeError("out of memory")

    engine._prefill = broken
    with pytest.raises(RuntimeError):
        engine.step()
    failed = engine.fail_all("generation failed: out of memory")
    assert set(failed) == {running, newcomer, queued} and not engine.has_work()
    assert all(r.finish_reason == "error" and "out of memory" in r.error for r in failed)


def test_requests_that_cannot_fit_are_refused():
    engine = Engine(build(), TOKENIZER, slots=1, max_len=16)
    with pytest.raises(ValueError, match="over the limit of 16"):
        engine.add(Request(prompt=[1] * 10, max_new_tokens=7))
    with pytest.raises(ValueError, match="no tokens"):
        engine.add(Request(prompt=[], max_new_tokens=1))
    engine.add(Request(prompt=[1] * 10, max_new_tokens=6))


@pytest.mark.long  # make test-long (CI runs it): a benchmark's CPU smoke run
def test_decode_benchmark_runs_on_cpu(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "decode.json"
    args = ["--recipe", str(root / "recipes/tiny_hybrid.toml"), "--contexts", "8,40"]
    args += ["--batches", "1,3", "--steps", "2", "--warmup", "1", "--device", "cpu"]
    args += ["--dtype", "float32", "--prefill", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks/decode.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    decode = [r for r in rows if r.get("impl") != "prefill"]
    assert [(r["context"], r["batch"]) for r in decode] == [(8, 1), (8, 3), (40, 1), (40, 3)]
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in decode)
    prefill = [r for r in rows if r.get("impl") == "prefill"]
    assert [r["context"] for r in prefill] == [8, 40]
    assert all(r["prefill_s"] > 0 for r in prefill)
