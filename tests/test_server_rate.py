"""What the engine does per step for a server: when it wakes the HTTP threads, and the decode
steps it counts (the server's decode rate, compared with the engine's own by serve_load)."""

import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_engine import TOKENIZER, build, one_thread, prompts  # noqa: F401 (autouse fixture)
from tests.test_server_warm import Gated
from toolkit.inference import api
from toolkit.inference.engine import Engine, Request
from toolkit.inference.server import GenerationServer, Updates

ROOT = Path(__file__).resolve().parents[1]


def test_overlap_hands_a_steps_tokens_over_after_the_next_launch():
    """With a decode step launched ahead, the requests a step updated are handed to on_update
    at the next step, once it has launched: woken threads then take the GIL while the engine
    waits for the device, not while it prepares a launch. Every update still arrives, one per
    step, and the last says done."""
    engine = Engine(build(), TOKENIZER, slots=2, cuda_graphs=True, overlap=True)
    launches = []
    launch = engine.decoder.launch
    engine.decoder.launch = lambda *a: launches.append(1) or launch(*a)
    seen: list[tuple[int, int, bool]] = []  # (tokens, launches so far, done) at each update
    r = Request(prompt=prompts(4)[0], max_new_tokens=7, stop_at_eod=False)
    r.on_update = lambda r: seen.append((len(r.tokens), len(launches), r.done))
    engine.run([r])
    assert [t for t, _, _ in seen] == list(range(1, 8)) and seen[-1][2]
    assert not any(done for _, _, done in seen[:-1]) and not engine.has_work()
    # Token t (2 <= t <= 6) comes from launch t - 1 and is handed over after launch t + 1
    # (launch t is already running when it is read); no launch follows the 6th's read.
    assert [n for _, n, _ in seen] == [0, 3, 4, 5, 6, 6, 6], seen


def test_the_last_update_reaches_a_request_that_stops_with_a_step_launched_for_it():
    """A stop string ends a request after a step was launched ahead for it: nothing runs any
    more, yet its last update is still to be handed over; the engine has work until it is."""
    model = build()
    p = prompts(4)[0]
    free = Engine(model, TOKENIZER, slots=1).run([Request(prompt=p, max_new_tokens=12)])[0]
    text = TOKENIZER.decode(free.tokens)
    engine = Engine(model, TOKENIZER, slots=2, cuda_graphs=True, overlap=True)
    r = Request(prompt=p, max_new_tokens=12, stop=[text[3:5]])
    updates = []
    r.on_update = lambda r: updates.append((len(r.tokens), r.done))
    engine.run([r])
    assert r.finish_reason == "stop" and len(r.tokens) < 12, (r.tokens, free.tokens)
    assert updates[-1] == (len(r.tokens), True) and not engine.unsent


@pytest.mark.parametrize("overlap", [False, True])
def test_decode_steps_are_counted_by_live_batch(overlap):
    """Steps that ran no prefill pass and gave tokens are decode steps, keyed by how many
    tokens they gave; the admission step's first tokens are not decode tokens."""
    engine = Engine(build(), TOKENIZER, slots=2, cuda_graphs=overlap, overlap=overlap)
    a, b = (Request(prompt=p, max_new_tokens=n) for p, n in zip(prompts(3, 5), (3, 6)))
    a.stop_at_eod = b.stop_at_eod = False
    engine.run([a, b])
    stats = engine.stats
    assert stats["generated_tokens"] == 9 and stats["first_tokens"] == 2
    assert stats["decode_tokens"] == 7 and stats["decode_steps"] == 5
    by_batch = engine.decode_by_batch
    assert {b: (d["steps"], d["tokens"]) for b, d in by_batch.items()} == {2: (2, 4), 1: (3, 3)}
    assert all(d["seconds"] > 0 for d in by_batch.values())
    assert stats["decode_seconds"] == pytest.approx(sum(d["seconds"] for d in by_batch.values()))


@pytest.fixture
def gated():
    g = Gated()
    yield g
    g.close()


def test_a_stream_of_several_prompts_wakes_its_thread_at_most_once_a_step(gated):
    """Each of a stream's requests changes at every step; its thread is woken once for all
    of them (it reads every choice when woken), not once per request and step, and every
    choice still gets all its tokens."""
    gated.gate.set()
    assert gated.server.engine_thread.ready.wait(60)
    engine, server = gated.engine, gated.server
    steps, wakes = engine.steps, server.wakes  # (counted at the start of a step)
    body = {"prompt": ["def ", "x = "], "max_tokens": 10, "temperature": 0, "stream": True}
    body |= {"ignore_eos": True, "logprobs": 0}
    conn = http.client.HTTPConnection("127.0.0.1", gated.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    events = [
        json.loads(line[6:])["choices"][0]
        for line in response.read().decode().splitlines()
        if line.startswith("data: {")
    ]
    conn.close()
    tokens = {0: 0, 1: 0}
    for e in events:
        tokens[e["index"]] += len(e["logprobs"]["tokens"])
    assert tokens == {0: 10, 1: 10}, events
    assert 1 <= server.wakes - wakes <= engine.steps - steps


def test_serve_host_benchmark_smoke(tmp_path):
    """benchmarks/serve_host.py end to end with small numbers: both runs reported."""
    out = tmp_path / "host.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/serve_host.py"), "--clients", "3"]
        + ["--kind", "mixed", "--tokens", "4", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    for run in (results["alone"], results["server"]):
        assert run["decode_steps"] > 0 and run["decode_ms_per_step"] > 0
        assert run["engine_thread_cpu_ms_per_step"] > 0
    assert results["server"]["wakes_per_step"] > 0 and results["alone"]["wakes_per_step"] == 0


def test_top_k_1_runs_as_greedy_with_the_same_tokens_and_logprobs():
    """top_k=1 (the reference client's greedy) is parsed as greedy: each step takes the argmax
    path (no random draw, no top-k pass); tokens and logprobs are those top-k sampling gave."""
    limits = api.Limits(max_len=64)
    body = {"prompts": ["def "], "tokens_to_generate": 8, "top_k": 1, "temperature": 0.7}
    (parsed,) = api.parse_megatron(body | {"logprobs": True}, TOKENIZER, limits)
    completion = {"prompt": "def ", "max_tokens": 8, "top_k": 1, "temperature": 0.7}
    (parsed_v1,) = api.parse_completion(completion, TOKENIZER, limits).requests
    assert (parsed.temperature, parsed.top_k) == (parsed_v1.temperature, parsed_v1.top_k) == (0, 0)
    sampled = Request(
        prompt=parsed.prompt, max_new_tokens=8, temperature=0.7, top_k=1, logprobs=True, seed=3
    )
    model = build()
    Engine(model, TOKENIZER, slots=2).run([parsed, sampled])
    assert parsed.tokens == sampled.tokens
    assert parsed.token_logprobs == pytest.approx(sampled.token_logprobs, abs=1e-12)


class Counted(Updates):
    """Updates that counts its calls (the engine's updates of its requests) and notes the
    tokens of the request that woke it at each wake."""

    calls = 0

    def __call__(self, r: Request) -> None:
        self.calls += 1
        pending = self.pending
        super().__call__(r)
        if self.pending and not pending:
            self.tokens = len(r.tokens)


def stepped_wakes(engine: Engine, requests: list[Request]) -> list[dict[int, int]]:
    """Step the engine to the end, reading each request's Updates as its HTTP thread would:
    per step that handed tokens over, the streams woken (their index: the tokens then)."""
    woken = []
    while engine.has_work():
        calls = sum(r.on_update.calls for r in requests)
        engine.step()
        updates = [r.on_update for r in requests]
        woken.append({i: u.tokens for i, u in enumerate(updates) if not u.queue.empty()})
        for i in woken[-1]:
            updates[i].get(timeout=0)
        if calls == sum(u.calls for u in updates):
            assert not woken.pop()  # overlap: the admission's tokens are handed over later
    return woken


@pytest.mark.parametrize("overlap", [False, True])
def test_streams_share_a_budget_of_wakes_per_step(overlap):
    """Six streams, a budget of two wakes per step: each is woken every third step (at a phase
    of its own, so two a step), and always for its first token and its end; a stream alone is
    woken for every token."""
    engine = Engine(build(), TOKENIZER, slots=8, cuda_graphs=overlap, overlap=overlap)
    server = GenerationServer(("127.0.0.1", 0), engine, stream_wakes=2)
    try:
        requests = [
            Request(prompt=p, max_new_tokens=20, stop_at_eod=False) for p in prompts(*[4] * 6)
        ]
        for r in requests:
            r.on_update = Counted(server, every=True)
            engine.add(r)
        woken = stepped_wakes(engine, requests)
        # The last step wakes all: each one's end (in one wake with its token before, if due).
        assert woken[0] == dict.fromkeys(range(6), 1) and set(woken[-1]) == set(range(6))
        assert all(len(w) == 2 for w in woken[1:-1]), woken
        for i in range(6):  # every third token (step)
            tokens = [w[i] for w in woken if i in w]
            assert max(b - a for a, b in zip(tokens, tokens[1:])) == 3, (i, woken)

        lone = Request(prompt=prompts(4)[0], max_new_tokens=10, stop_at_eod=False)
        lone.on_update = Counted(server, every=True)
        engine.add(lone)
        # (Overlap: the last step hands over the last two tokens, in one wake.)
        last = 9 if overlap else 10
        assert stepped_wakes(engine, [lone]) == [{0: n} for n in range(1, last + 1)]
    finally:
        server.server_close()


def test_streams_woken_every_few_steps_send_the_same_output():
    """Four streams at once under a budget of one wake a step: each is woken every fourth step,
    its events carry several tokens, and what they add up to (text, logprobs' tokens, finish
    reason) is the answer the same request gets whole."""
    engine = Engine(build(), TOKENIZER, slots=4, cuda_graphs=True, overlap=True)
    server = GenerationServer(("127.0.0.1", 0), engine, stream_wakes=1)
    thread, take = server.engine_thread, server.engine_thread._take
    gather, gathering = threading.Event(), threading.Event()

    def gathered(idle_timeout: float | None = None) -> None:  # the four admitted together
        if gather.is_set() and not engine.has_work():
            gathering.set()
            while thread.inbox.qsize() < 4:
                time.sleep(0.01)
            gather.clear()
            take(idle_timeout)
        else:  # idle, look again every 10 ms: blocked in the inbox, it would take the first alone
            take(0.01)

    thread._take = gathered
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert thread.ready.wait(60)
        bodies = [
            {"prompt": p, "max_tokens": 24, "temperature": t, "seed": 5, "logprobs": 0}
            | {"ignore_eos": True}
            for p, t in [("def ", 0), ("x = ", 0), ("import", 0.8), ("class ", 0.8)]
        ]
        port = server.server_address[1]
        whole = [post(port, b) for b in bodies]
        wakes = server.wakes
        gather.set()
        assert gathering.wait(10)  # the engine thread waits for all four before it takes one
        streams: list = [None] * 4

        def send(i: int) -> None:
            streams[i] = post(port, bodies[i] | {"stream": True})

        clients = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
        for answer, events in zip(whole, streams):
            choice = answer["choices"][0]
            assert "".join(e["text"] for e in events) == choice["text"]
            tokens = [t for e in events for t in e["logprobs"]["tokens"]]
            assert tokens == choice["logprobs"]["tokens"]
            assert [e["finish_reason"] for e in events][-1] == choice["finish_reason"] == "length"
            assert len(events) <= 24 // 4 + 3, events  # first token, every 4th step, the end
        assert server.wakes - wakes <= 4 * (24 // 4 + 3)  # 96 woken at every step
    finally:
        server.shutdown()
        server.server_close()


def post(port: int, body: dict) -> Any:
    """The JSON answer of POST /v1/completions, or a stream's events' first choices."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    data = conn.getresponse().read().decode()
    conn.close()
    if not body.get("stream"):
        return json.loads(data)
    lines = [line[6:] for line in data.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines
    return [json.loads(line)["choices"][0] for line in lines[:-1]]
