"""The server is warm when it says it is ready: it listens from the start, answers 503
"starting" on /health and on generation requests while its engine warms up (here held back by
an Event the test controls, through the server's own warm_up hook), then 200; the interactive
client waits for it; a failed warm-up stops the server."""

import http.client
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.test_engine import TOKENIZER, build, one_thread  # noqa: F401 (autouse fixture)
from toolkit.inference import server as server_module
from toolkit.inference.engine import Engine
from toolkit.inference.server import GenerationServer

ROOT = Path(__file__).resolve().parents[1]


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """(status, parsed JSON, headers) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, data, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read()), dict(resp.getheaders())
    conn.close()
    return out


class Gated:
    """A server whose warm-up (the engine's own) waits for `gate`; `started`: it has begun."""

    def __init__(self, warm_up=None) -> None:
        self.engine = Engine(build(), TOKENIZER, slots=2, cuda_graphs=True)
        self.started, self.gate = threading.Event(), threading.Event()
        self.warmed = 0

        def gated() -> None:
            self.started.set()
            assert self.gate.wait(60)
            self.warmed = (warm_up or self.engine.warm_up)()

        self.server = GenerationServer(("127.0.0.1", 0), self.engine, warm_up=gated)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        assert self.started.wait(60)

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.thread.join(60)
        self.server.server_close()


@pytest.fixture
def gated():
    g = Gated()
    yield g
    g.close()


def test_health_is_503_starting_until_warm_then_200(gated):
    status, body, headers = call(gated.port, "GET", "/health")
    assert (status, body["status"], headers["Retry-After"]) == (503, "starting", "1")
    api = {"prompts": ["def "], "tokens_to_generate": 4, "top_k": 1}
    status, body, _ = call(gated.port, "PUT", "/api", api)
    assert status == 503 and "starting" in body["message"], body
    status, body, _ = call(gated.port, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})
    assert status == 503 and body["error"]["type"] == "server_error"
    assert "retry when GET /health answers 200" in body["error"]["message"]
    assert gated.engine.stats["prompt_tokens"] == 0  # nothing was queued meanwhile

    gated.gate.set()
    assert gated.server.engine_thread.ready.wait(60)
    assert gated.warmed == 2  # the engine's warm-up ran: one step per batch bucket [1, 2]
    status, body, _ = call(gated.port, "GET", "/health")
    assert (status, body["status"]) == (200, "ok")
    status, body, _ = call(gated.port, "PUT", "/api", api)
    assert status == 200 and len(body["tokens"][0]) > 1


def test_interactive_client_waits_for_a_starting_server(gated):
    client = subprocess.Popen(
        [sys.executable, str(ROOT / "launchers/generate_cli.py"), f"127.0.0.1:{gated.port}"]
        + ["--tokens-to-generate", "3", "--top-k", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client.stdin.write("def \n")
    client.stdin.close()
    # The client has been answered 503 and says so; only then may warm-up end.
    assert "the server is starting" in client.stderr.readline()
    gated.gate.set()
    out = client.stdout.read()
    assert client.wait(60) == 0
    assert "Response:" in out and "Error" not in out, out


def test_failed_warm_up_stops_the_server():
    def broken() -> int:
        raise RuntimeError("no memory for the graphs")

    g = Gated(warm_up=broken)
    try:
        g.gate.set()
        g.thread.join(60)  # the server stopped itself
        assert not g.thread.is_alive()
        assert (
            g.server.engine_thread.failed
            == "warm-up failed: RuntimeError: no memory for the graphs"
        )
        assert not g.server.engine_thread.ready.is_set()
    finally:
        g.server.server_close()


def test_warm_up_runs_requests_through_prefill_and_sampling_and_forgets_them():
    """Beyond the decode buckets, warm-up prefills a few prompts together (fresh and continuing
    passes; every pass shape is test_prefill_passes.py's), samples and decodes them; then the
    engine is as new: no counts, free slots, the same answers."""
    from tests.test_engine import clone, prompts
    from toolkit.inference.engine import Request

    torch.manual_seed(0)
    model = build()
    warm, cold = (Engine(model, TOKENIZER, slots=3) for _ in "ab")
    pieces = []
    hidden = model.hidden
    model.hidden = lambda tokens, states=None: (
        pieces.append(tuple(tokens.shape)) or hidden(tokens, states)
    )
    assert warm.warm_up() == 0  # no static decoder on the CPU by default
    del model.hidden
    # The prompts (1, 17, 62 tokens) prefilled: rows padded to a power of two, positions to 16,
    # 32, ... (Engine._pass).
    assert pieces[:3] == [(4, 16), (2, 16), (1, 32)]
    assert len(pieces) > 3  # then decoded
    assert warm.stats == dict.fromkeys(warm.stats, 0) and not warm.active and not warm.waiting
    requests = [
        Request(prompt=p, max_new_tokens=6, temperature=t, seed=3)
        for p, t in zip(prompts(5, 9, 3), (0.0, 0.9, 0.0))
    ]
    again = [clone(r) for r in requests]
    warm.run(requests), cold.run(again)
    assert [r.tokens for r in requests] == [r.tokens for r in again]

    def counts(stats: dict) -> dict:  # the host times differ from run to run
        return {k: v for k, v in stats.items() if not k.endswith("_seconds")}

    assert counts(warm.stats) == counts(cold.stats)


def test_a_whole_answer_wakes_its_thread_once_a_stream_every_token(gated, monkeypatch):
    """A request that waits for its whole answer is woken when it is done, not at every engine
    step: each wake takes the GIL from the engine's thread (with tens of clients on the H200
    that made every step 2-6x slower). A stream still gets every token as it comes."""
    puts = []

    class Counting(queue.SimpleQueue):
        def put(self, item, block=True, timeout=None):
            puts.append(threading.current_thread().name)
            super().put(item, block, timeout)

    monkeypatch.setattr(server_module.queue, "SimpleQueue", Counting)
    streams = []  # the streams' Updates: the engine steps only once their last wake was taken

    class Recorded(server_module.Updates):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if self.every:
                streams.append(self)

    step = gated.engine.step

    def step_after_the_streams_caught_up() -> None:
        # One wake is pending at most: a stream's thread that fell behind (a loaded CI machine)
        # is woken once for several tokens. Waiting for it makes the count per step exact.
        deadline = time.monotonic() + 30
        while any(u.pending for u in streams) and time.monotonic() < deadline:
            time.sleep(0.001)
        step()

    monkeypatch.setattr(server_module, "Updates", Recorded)
    monkeypatch.setattr(gated.engine, "step", step_after_the_streams_caught_up)
    gated.gate.set()
    assert gated.server.engine_thread.ready.wait(60)
    api = {"prompts": ["def "], "tokens_to_generate": 12, "top_k": 1}
    status, body, _ = call(gated.port, "PUT", "/api", api)
    assert status == 200 and len(body["tokens"][0]) - 4 >= 4, body  # 4 steps or more
    assert puts == ["engine"]  # once, from the engine thread, when the answer was done
    del puts[:]
    body = {"prompt": "def ", "max_tokens": 12, "temperature": 0, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", gated.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    text = response.read().decode()
    assert response.status == 200, text
    events = text.count("data: ")
    conn.close()
    assert len(puts) >= 4 and events >= 1, (puts, events)  # every token woke the stream
