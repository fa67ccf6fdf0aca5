"""The text-generation server as a real process on localhost: API contracts, bad input, many
concurrent clients, streaming and disconnects, the bearer token, the interactive client."""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.test_engine import one_thread  # noqa: F401 (autouse fixture)
from toolkit.build import build_model, model_from_checkpoint, save_model_checkpoint
from toolkit.config import load_recipe
from toolkit.distributed import free_port
from toolkit.inference import api
from toolkit.inference.engine import Engine
from toolkit.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret"
MAX_LEN = 4096


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    recipe = load_recipe(ROOT / "recipes/tiny_hybrid.toml", ["model.hidden_size=64"])
    torch.manual_seed(0)
    model = build_model(recipe, build_tokenizer("byte"))
    return save_model_checkpoint(tmp_path_factory.mktemp("ckpt"), model, recipe)


class Server:
    def __init__(self, checkpoint: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.log = log
        cmd = [sys.executable, str(ROOT / "launchers/serve.py"), "--checkpoint", str(checkpoint)]
        cmd += ["--port", str(self.port), "--dtype", "float64", "--max-len", str(MAX_LEN), *args]
        env = os.environ | {"OMP_NUM_THREADS": "1", "TOOLKIT_SERVE_TOKEN": ""}
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if self.call("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)  # or still warming up (503)
        raise TimeoutError(log.read_text())

    def call(self, method: str, path: str, body=None, headers=None, token: str | None = TOKEN):
        """(status, parsed JSON) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        hdrs = {"Content-Type": "application/json"} | (
            {"Authorization": f"Bearer {token}"} if token else {}
        )
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, data, hdrs | (headers or {}))
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read())
        conn.close()
        return out

    def health(self) -> dict:
        return self.call("GET", "/health", token=None)[1]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = Server(
        checkpoint,
        tmp_path_factory.mktemp("log") / "server.log",
        "--slots",
        "8",
        "--token",
        TOKEN,
        "--max-body-bytes",
        "16384",
    )
    yield s
    s.stop()
    assert s.proc.returncode == 0  # SIGTERM ends it cleanly


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The same model run alone in this process: what every response must equal."""
    model, _, tokenizer = model_from_checkpoint(str(checkpoint))
    return reference_runner(model.double(), tokenizer)


def reference_runner(model, tokenizer):
    """(path, body) -> the response `model` alone gives, through a fresh one-slot engine."""
    limits = api.Limits(max_len=MAX_LEN)

    def run(path: str, body: dict) -> dict:
        engine = Engine(model, tokenizer, slots=1, max_len=MAX_LEN)
        if path == "/api":
            return api.megatron_response(
                engine.run(api.parse_megatron(body, tokenizer, limits)), tokenizer
            )
        c = api.parse_completion(body, tokenizer, limits)
        engine.run(c.requests)
        return api.completion_response(c, tokenizer, "tiny_hybrid")

    return run


def keys(top: list[dict] | None) -> list[list[str]] | None:
    return None if top is None else [list(alternatives) for alternatives in top]


def same(got: dict, expected: dict) -> None:
    """Equal, logprobs to float64 rounding (batched and alone matmuls round differently)."""
    for key in ("text", "segments", "tokens"):
        assert got.get(key) == expected.get(key), key
    if "choices" in expected:
        for g, e in zip(got["choices"], expected["choices"], strict=True):
            assert (g["text"], g["finish_reason"]) == (e["text"], e["finish_reason"])
            assert (g["logprobs"] is None) == (e["logprobs"] is None)
            if e["logprobs"]:
                assert g["logprobs"]["tokens"] == e["logprobs"]["tokens"]
                assert g["logprobs"]["token_logprobs"] == pytest.approx(
                    e["logprobs"]["token_logprobs"]
                )
                assert keys(g["logprobs"]["top_logprobs"]) == keys(e["logprobs"]["top_logprobs"])
    if expected.get("logprobs"):
        for g, e in zip(got["logprobs"], expected["logprobs"], strict=True):
            assert g == pytest.approx(e)


BAD = [
    ("/api", {"tokens_to_generate": 4}, "prompts"),
    ("/api", {"prompts": []}, "prompts"),
    ("/api", {"prompts": ["a"] * 129}, "prompts"),
    ("/api", {"prompts": "a b".split() + [3]}, "prompts"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": -1}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": 2.5}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": "8"}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": True}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "tokens_to_generate": 0}, "tokens_to_generate"),
    ("/api", {"prompts": ["a"], "temperature": 0}, "temperature"),
    ("/api", {"prompts": ["a"], "temperature": 100.5}, "temperature"),
    ("/api", {"prompts": ["a"], "temperature": "hot"}, "temperature"),
    ("/api", {"prompts": ["a"], "top_k": 5, "top_p": 0.5}, "top_p"),
    ("/api", {"prompts": ["a"], "top_k": -2}, "top_k"),
    ("/api", {"prompts": ["a"], "top_p": 1.5}, "top_p"),
    ("/api", {"prompts": ["a"], "random_seed": "x"}, "random_seed"),
    ("/api", {"prompts": ["a"], "random_seed": 2**64}, "random_seed"),
    ("/api", {"prompts": ["a", "\ud800"]}, "prompts"),
    ("/api", {"prompts": ["x" * (MAX_LEN - 10)], "tokens_to_generate": 20}, "prompts"),
    ("/api", [1, 2], "body"),
    ("/api", {"prompts": ["a"], "top_p": 0.9, "top_p_decay": 0.5}, "top_p_decay"),
    ("/api", {"prompts": ["a"], "top_p": 0.9, "top_p_bound": 0.1}, "top_p_bound"),
    (
        "/api",
        {"prompts": ["a"], "prevent_newline_after_colon": True},
        "prevent_newline_after_colon",
    ),
    ("/api", {"prompts": ["a"], "stop_token": "eod"}, "stop_token"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": 101}, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_k": 3, "top_p": 0.9}, "top_p"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "a", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "max_tokens": MAX_LEN}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [True]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": [100, 259]}, "prompt"),  # the byte vocabulary is [0, 259)
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": [1] * MAX_LEN, "max_tokens": 1}, "prompt"),
    (
        "/v1/completions",
        {"prompt": "a", "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": 1}, "stream_options"),
    (
        "/v1/completions",
        {"prompt": "a", "stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options",
    ),
    ("/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": 3}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": -1},
        "max_completion_tokens",
    ),
    ("/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 2}, "n"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": -0.1}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"50": 100}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "tools": [{}]},
        "tools",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "a"}],
            "response_format": {"type": "json_object"},
        },
        "response_format",
    ),
]


@pytest.mark.parametrize(
    "path,body,field", BAD, ids=[f"{p}:{f}:{i}" for i, (p, _, f) in enumerate(BAD)]
)
def test_bad_input_is_400_naming_the_field(server, path, body, field):
    status, reply = server.call("PUT" if path == "/api" else "POST", path, body)
    assert status == 400, reply
    named = reply["field"] if path == "/api" else reply["error"]["param"]
    assert named == field, reply


@pytest.mark.parametrize(
    "data,headers,field",
    [
        (b'{"prompts": ["a"], ', {}, "body"),
        (b"\xff\xfe", {}, "body"),
        (b'{"prompts": ["a"]}', {"Content-Type": "text/plain"}, "Content-Type"),
        (b'{"prompts": ["' + b"a" * 20000 + b'"]}', {}, "Content-Length"),
        (b"[" * 10000, {}, "body"),
    ],
    ids=["malformed", "not-utf8", "content-type", "oversize", "too-deep"],
)
def test_bad_bodies_are_400(server, data, headers, field):
    status, reply = server.call("PUT", "/api", data, headers)
    assert (status, reply["field"]) == (400, field), reply


def test_unknown_paths_and_methods(server):
    assert server.call("GET", "/nope")[0] == 404
    assert server.call("POST", "/api", {"prompts": ["a"]})[0] == 405
    assert server.call("DELETE", "/api")[0] == 405
    assert server.health()["status"] == "ok"  # the bad requests above did not hurt it


def test_the_references_fields_that_change_nothing_are_served(server):
    """Fields of the reference's PUT /api at their off values, and its beam search's own
    (stop_token, length_penalty), are accepted: the same answer as without them."""
    body = {"prompts": ["def "], "tokens_to_generate": 6, "top_k": 1}
    extra = {"top_p_decay": 0.0, "top_p_bound": 0.0, "prevent_newline_after_colon": False}
    extra |= {"stop_token": 50256, "length_penalty": 1.0}
    status, plain = server.call("PUT", "/api", body)
    assert status == 200, plain
    assert server.call("PUT", "/api", body | extra) == (200, plain)


def test_openai_fields_at_their_off_values_are_served(server):
    """OpenAI's fields the server refuses when set (penalties, logit_bias, suffix, tools,
    response_format other than text) change nothing at their off values, which clients send."""
    body = {"prompt": "def ", "max_tokens": 6, "temperature": 0}
    off = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None}
    assert (
        server.call("POST", "/v1/completions", body | off)[1]["choices"]
        == (server.call("POST", "/v1/completions", body)[1]["choices"])
    )
    chat = {"messages": CHAT, "max_tokens": 6, "temperature": 0}
    chat_off = {"tools": [], "response_format": {"type": "text"}, "logit_bias": None}
    assert (
        server.call("POST", "/v1/chat/completions", chat | chat_off)[1]["choices"]
        == (server.call("POST", "/v1/chat/completions", chat)[1]["choices"])
    )


def test_extreme_but_valid_values_are_served(server):
    body = {"prompts": ["a"], "tokens_to_generate": 2, "top_k": 2**31 - 1, "random_seed": 2**64 - 1}
    status, reply = server.call("PUT", "/api", body)
    # The prompt and up to two tokens (this seed's first draw happens to be the end of document).
    assert status == 200 and len(reply["tokens"][0]) in (2, 3)
    assert server.call("PUT", "/api", body | {"top_k": 2**31})[0] == 400


def test_bearer_token_required(server):
    body = {"prompts": ["a"], "tokens_to_generate": 2}
    assert server.call("PUT", "/api", body, token=None)[0] == 401
    status, reply = server.call("PUT", "/api", body, token="wrong")
    assert status == 401 and reply["field"] == "Authorization"
    assert server.call("PUT", "/api", body)[0] == 200
    assert server.call("GET", "/health", token=None)[0] == 200


def test_64_concurrent_clients_each_get_their_own_answer(server, reference):
    def body(i: int) -> tuple[str, dict]:
        if i % 2:
            return "/v1/completions", {
                "prompt": f"client {i} says",
                "max_tokens": 4 + i % 7,
                "temperature": [0.0, 0.8][i % 4 == 1],
                "seed": i,
                "logprobs": i % 3,
            }
        return "/api", {
            "prompts": [f"def f{i}(", "x" * (i % 5 + 1)],
            "tokens_to_generate": 3 + i % 9,
            "temperature": 0.5 + i / 64,
            "top_k": i % 4,
            "random_seed": i,
            "logprobs": True,
        }

    def call(i: int) -> dict:
        path, b = body(i)
        status, reply = server.call("PUT" if path == "/api" else "POST", path, b)
        assert status == 200, reply
        return reply

    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(call, range(64)))
    for i, reply in enumerate(replies):
        same(reply, reference(*body(i)))


def test_scoring_a_prompt_without_generating(server, reference):
    body = {"prompts": ["def f(x):", "ab"], "tokens_to_generate": 0, "logprobs": True}
    status, reply = server.call("PUT", "/api", body)
    assert status == 200 and reply["text"] == body["prompts"]
    assert [len(lp) for lp in reply["logprobs"]] == [8, 1]
    same(reply, reference("/api", body))


def test_same_seed_same_text(server):
    body = {"prompts": ["import "], "tokens_to_generate": 24, "random_seed": 7}
    first, again = (server.call("PUT", "/api", body)[1] for _ in range(2))
    other = server.call("PUT", "/api", body | {"random_seed": 8})[1]
    assert first == again and first["tokens"] != other["tokens"]


def completion(port: int, body: dict, path: str = "/v1/completions") -> socket.socket:
    """A completions request on a raw socket, left open for the caller to read or drop."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def stream(port: int, body: dict, path: str = "/v1/completions") -> socket.socket:
    return completion(port, body | {"stream": True}, path)


def events(sock: socket.socket) -> list[str]:
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"200 OK" in head and b"text/event-stream" in head
    return [e.removeprefix("data: ") for e in body.decode().split("\n\n") if e]


def test_prompts_as_token_ids_answer_as_their_text(server, reference):
    """OpenAI's token-id prompts (a list of ids, or a list of lists, as lm-evaluation-harness's
    completions client sends them): the same answer as the text they encode, echo included."""
    texts = ["def f(x):", "import o"]
    ids = [list(t.encode()) for t in texts]  # the byte tokenizer's ids
    body = {"max_tokens": 12, "temperature": 0, "logprobs": 2}
    status, by_text = server.call("POST", "/v1/completions", body | {"prompt": texts})
    assert status == 200, by_text
    for prompt in (ids, ids[0]):
        status, by_ids = server.call("POST", "/v1/completions", body | {"prompt": prompt})
        assert status == 200, by_ids
        n = len(by_ids["choices"])
        assert n == (2 if prompt is ids else 1)
        same(by_ids, by_text | {"choices": by_text["choices"][:n]})
    same(by_text, reference("/v1/completions", body | {"prompt": ids}))
    status, echoed = server.call("POST", "/v1/completions", body | {"prompt": ids, "echo": True})
    assert status == 200, echoed
    assert [c["text"] for c in echoed["choices"]] == [
        t + c["text"] for t, c in zip(texts, by_text["choices"])
    ]  # echo decodes the ids


def test_a_stream_ends_with_its_usage_when_asked(server):
    """stream_options.include_usage (OpenAI's): every chunk has usage null, and a last one
    before [DONE], with no choices, has the token counts the whole answer reports."""
    body = {"prompt": ["for i in", "x = "], "max_tokens": 9, "temperature": 0}
    whole = server.call("POST", "/v1/completions", body)[1]
    parts = events(stream(server.port, body | {"stream_options": {"include_usage": True}}))
    assert parts[-1] == "[DONE]"
    chunks = [json.loads(p) for p in parts[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None and c["choices"] for c in chunks[:-1]) and len(chunks) > 2
    plain = [json.loads(p) for p in events(stream(server.port, body))[:-1]]
    assert all("usage" not in c and c["choices"] for c in plain)  # not asked: as before


def test_megatrons_completions_path_answers_as_v1(server):
    """/completions, where Megatron's own server answers too, is /v1/completions."""
    body = {"prompt": "def f(", "max_tokens": 10, "temperature": 0}
    status, alias = server.call("POST", "/completions", body)
    assert status == 200, alias
    assert alias["choices"] == server.call("POST", "/v1/completions", body)[1]["choices"]
    streamed = [json.loads(p) for p in events(stream(server.port, body, "/completions"))[:-1]]
    assert "".join(c["choices"][0]["text"] for c in streamed) == alias["choices"][0]["text"]


CHAT = [
    {"role": "system", "content": "You write Python."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "def add"}, {"type": "text", "text": "("}],
    },
    {"role": "assistant", "content": "a, b):"},
    {"role": "user", "content": "    return"},
]


def test_chat_is_a_completion_of_its_messages_as_one_prompt(server):
    """/v1/chat/completions (and /chat/completions, as Megatron's server): the messages joined
    by Megatron's template for pretrained models (api.chat_prompt) and completed; the answer as
    the assistant's message, logprobs in chat's form, the same tokens as /v1/completions."""
    prompt = "You write Python.\ndef add(\na, b):\n\n    return\n"
    assert api.chat_prompt([api._message(m, i) for i, m in enumerate(CHAT)]) == prompt
    settings = {"max_tokens": 10, "temperature": 0}
    status, chat = server.call(
        "POST",
        "/v1/chat/completions",
        settings | {"messages": CHAT, "logprobs": True, "top_logprobs": 2},
    )
    assert status == 200, chat
    text = server.call("POST", "/v1/completions", settings | {"prompt": prompt, "logprobs": 2})[1]
    choice, plain = chat["choices"][0], text["choices"][0]
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert choice["message"] == {"role": "assistant", "content": plain["text"]}
    assert choice["finish_reason"] == plain["finish_reason"] and chat["usage"] == text["usage"]
    tokens = choice["logprobs"]["content"]
    assert [t["token"] for t in tokens] == plain["logprobs"]["tokens"]
    assert [t["logprob"] for t in tokens] == pytest.approx(plain["logprobs"]["token_logprobs"])
    assert all(
        len(t["top_logprobs"]) == 2 and t["bytes"] == list(t["token"].encode()) for t in tokens
    )
    status, alias = server.call("POST", "/chat/completions", settings | {"messages": CHAT})
    assert status == 200 and alias["choices"][0]["message"] == choice["message"]


def test_a_chat_stream_sends_the_role_then_deltas(server):
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
    whole = server.call("POST", "/v1/chat/completions", body)[1]
    parts = events(
        stream(
            server.port, body | {"stream_options": {"include_usage": True}}, "/v1/chat/completions"
        )
    )
    assert parts[-1] == "[DONE]"
    chunks = [json.loads(p) for p in parts[:-1]]
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert (
        "".join(d.get("content", "") for d in deltas) == whole["choices"][0]["message"]["content"]
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_a_chat_without_max_tokens_may_fill_the_context():
    """OpenAI's default for chat: up to the model's context, not a fixed count."""
    tokenizer = build_tokenizer("byte")
    c = api.parse_chat({"messages": CHAT[-1:]}, tokenizer, api.Limits(max_len=100))
    assert c.requests[0].max_new_tokens == 100 - len("    return\n") and c.chat


def test_stream_equals_the_whole_answer(server):
    body = {"prompt": "for i in", "max_tokens": 40, "temperature": 0.9, "seed": 3, "logprobs": 1}
    body["stop"] = ["e("]
    parts = events(stream(server.port, body))
    assert parts[-1] == "[DONE]"
    chunks = [json.loads(p)["choices"][0] for p in parts[:-1]]
    whole = server.call("POST", "/v1/completions", body)[1]["choices"][0]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [c["finish_reason"] for c in chunks][-1] == whole["finish_reason"]
    assert all(c["finish_reason"] is None for c in chunks[:-1]) and len(chunks) > 1
    streamed = [t for c in chunks for t in c["logprobs"]["tokens"]]
    assert streamed == whole["logprobs"]["tokens"]
    assert [x for c in chunks for x in c["logprobs"]["token_logprobs"]] == pytest.approx(
        whole["logprobs"]["token_logprobs"]
    )


def test_disconnecting_stream_client_stalls_nobody_and_frees_its_slot(server):
    before = server.health()["cancelled"]
    body = {"prompt": "while", "max_tokens": MAX_LEN - 10, "ignore_eos": True}
    sock = stream(server.port, body)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # it is generating; we stop reading
    # Seeded: an unseeded draw ends at the end-of-document token ~2% of the time (random model).
    body = {"prompts": ["ok"], "tokens_to_generate": 5, "random_seed": 1}
    status, reply = server.call("PUT", "/api", body)
    assert status == 200 and len(reply["tokens"][0]) == 7
    sock.close()
    deadline = time.monotonic() + 60
    while (h := server.health())["active"] or h["cancelled"] == before:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["cancelled"] == before + 1


def test_request_log_has_no_prompt_text(server):
    server.call("PUT", "/api", {"prompts": ["PRIVATE-TEXT"], "tokens_to_generate": 1})
    time.sleep(0.2)
    log = server.log.read_text()
    assert "PUT /api 200" in log and "PRIVATE-TEXT" not in log
    assert f"serving on http://127.0.0.1:{server.port}" in log


def test_open_server_logs_prompts_when_asked(checkpoint, tmp_path):
    s = Server(checkpoint, tmp_path / "log", "--log-prompts", "--slots", "2")
    try:
        status, reply = s.call(
            "PUT", "/api", {"prompts": ["SHOWN-TEXT"], "tokens_to_generate": 2}, token=None
        )
        assert status == 200 and reply["text"][0].startswith("SHOWN-TEXT")
        time.sleep(0.2)
        assert "SHOWN-TEXT" in s.log.read_text()
    finally:
        s.stop()


def run_cli(server: Server, text: str, *args: str) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launchers/generate_cli.py"),
            f"127.0.0.1:{server.port}",
            *args,
        ],
        input=text,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"TOOLKIT_SERVE_TOKEN": TOKEN},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_interactive_client(server, reference):
    out = run_cli(server, "def \n6\nx\n-1\nimport\nlots\n3\n", "--top-k", "1")
    expected = reference("/api", {"prompts": ["def "], "tokens_to_generate": 6, "top_k": 1})
    assert f"Response:\n{expected['text'][0]}\n" in out
    assert "Error 400: tokens_to_generate=-1 must be >= 0" in out
    assert "not a whole number: 'lots'" in out and out.count("Response:") == 2
    assert run_cli(server, "a\n", "--tokens-to-generate", "2").count("Response:") == 1


def test_serve_refuses_a_missing_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launchers/serve.py"), "--checkpoint", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr


def test_client_that_leaves_before_its_answer_frees_its_slot(server):
    before = server.health()["cancelled"]
    sock = completion(
        server.port, {"prompt": "bye", "max_tokens": MAX_LEN - 10, "ignore_eos": True}
    )
    deadline = time.monotonic() + 60
    while not server.health()["active"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()
    while (h := server.health())["active"] or h["cancelled"] == before:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["cancelled"] == before + 1


def test_server_listens_before_warm_up_and_logs_how_long_it_took(server):
    text = server.log.read_text()
    assert text.index("serving on") < text.index("warm-up took")
    assert re.search(r"warm-up took [\d.]+ s \(eager decode, no graphs; .*\); ready\n", text)


def test_ignore_eos_generates_to_the_limit():
    tokenizer, limits = build_tokenizer("byte"), api.Limits(max_len=64)
    body = {"prompt": "a", "ignore_eos": True}
    assert not api.parse_completion(body, tokenizer, limits).requests[0].stop_at_eod
    assert api.parse_completion({"prompt": "a"}, tokenizer, limits).requests[0].stop_at_eod


def test_a_gone_client_is_seen_past_the_first_1024_descriptors(descriptors_past_1024):
    """The check that a client left (every half second of a long answer) works on sockets
    numbered past select()'s 1024, which a server with many clients reaches."""
    from types import SimpleNamespace

    from toolkit.inference.server import Handler

    ours, peer = socket.socketpair()
    try:
        assert ours.fileno() > 1024
        handler = SimpleNamespace(connection=ours)
        assert Handler._client_gone(handler) is None  # still there, sending nothing
        peer.close()
        assert Handler._client_gone(handler) == "closed"
    finally:
        ours.close()
        peer.close()
