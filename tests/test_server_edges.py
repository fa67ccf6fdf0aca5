"""The server's HTTP edges as a real process: every method, every malformed request, fuzzed
fields and bytes on the socket get a JSON answer below 500; clients that reset their connection
leave one line in the log, not a traceback."""

import http.client
import json
import random
import re
import socket
import struct
import time

import pytest

from tests.test_server import TOKEN, Server, checkpoint  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):  # noqa: F811 (the imported fixture)
    log = tmp_path_factory.mktemp("edges") / "server.log"
    s = Server(checkpoint, log, "--slots", "4", "--token", TOKEN, "--max-body-bytes", "16384")
    yield s
    s.stop()


def request(port: int, method: str, path: str, headers: dict | None = None, body: bytes = b""):
    """(status, headers, body bytes) on one keep-alive connection of http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body or None, headers or {})
    resp = conn.getresponse()
    return resp.status, resp.headers, resp.read(), conn


def test_every_method_gets_json_and_allow(server):
    for method, path, status, allow in [
        ("HEAD", "/api", 405, "PUT, OPTIONS"),
        ("OPTIONS", "/api", 200, "PUT, OPTIONS"),
        ("GET", "/v1/completions", 405, "POST, OPTIONS"),
        ("OPTIONS", "/v1/completions", 200, "POST, OPTIONS"),
        ("TRACE", "/health", 405, "GET, HEAD, OPTIONS"),
        ("BREW", "/health", 405, "GET, HEAD, OPTIONS"),
        ("DELETE", "/api", 405, "PUT, OPTIONS"),
        ("BREW", "/coffee", 404, None),
        ("OPTIONS", "*", 404, None),
    ]:
        got, headers, body, conn = request(server.port, method, path)
        assert (got, headers["Allow"]) == (status, allow), (method, path, body)
        assert headers["Content-Type"] == "application/json", (method, path)
        if method == "HEAD":
            assert body == b""
        elif status == 200:
            assert json.loads(body) == {"allow": allow.split(", ")}
        else:
            reply = json.loads(body)
            message = reply["error"]["message"] if path.startswith("/v1/") else reply["message"]
            assert path in message
        conn.close()


def test_head_is_get_without_a_body(server):
    status, headers, body, conn = request(server.port, "HEAD", "/health")
    assert (status, body) == (200, b"") and int(headers["Content-Length"]) > 0
    # Nothing was sent after the headers: the same connection serves the next request.
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    conn.close()


def test_a_body_nobody_reads_is_not_taken_for_the_next_request(server):
    # Kept open, the connection would read the body as a request line and answer it.
    status, headers, _, conn = request(server.port, "GET", "/health", body=b"GET /nope HTTP/1.1")
    assert status == 200 and headers["Connection"] == "close"
    conn.close()


def raw(port: int, data: bytes, half_close: bool = False, head: bool = False) -> bytes:
    """Send bytes on a fresh socket; what the server answers, up to one whole response or until
    it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # it answered and closed before reading everything
            pass
        out = b""
        while not complete(out, head):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # it closed with our unread bytes queued
                break
            if not chunk:
                break
            out += chunk
        return out


def complete(data: bytes, is_head: bool) -> bool:
    """Whether `data` holds one whole final response (a 1xx may come before it)."""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return False
        if not re.match(rb"HTTP/1\.1 1\d\d ", head):
            break
        data = rest
    if is_head:  # no body, unless the request was too malformed to be read as a HEAD
        return b"\r\nconnection: close" not in head.lower()
    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    if length is None:  # a stream: it ends with the connection
        return False
    return len(rest) >= int(length[1])


def parse(data: bytes, head_request: bool) -> tuple[int, dict, list]:
    """(status, headers, JSON documents) of the first final response; asserts it is well formed."""
    head, _, rest = data.partition(b"\r\n\r\n")
    while re.match(rb"HTTP/1\.1 1\d\d ", head):
        head, _, rest = rest.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.fullmatch(r"HTTP/1\.1 (\d{3}) .+", lines[0])
    assert match, data[:300]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    status = int(match[1])
    if head_request and not rest:
        assert headers["content-type"] == "application/json"
        return status, headers, []
    if headers["content-type"] == "text/event-stream":
        assert status == 200
        events = [e.removeprefix("data: ") for e in rest.decode().split("\n\n") if e]
        assert events[-1] == "[DONE]", data[-300:]
        return status, headers, [json.loads(e) for e in events[:-1]]
    assert headers["content-type"] == "application/json", data[:300]
    length = int(headers["content-length"])
    return status, headers, [json.loads(rest[:length])]


# A value of every JSON type, and the edges of numbers and strings.
TYPES = [None, True, -1, 2**64, 1e308, float("nan"), 5e-324, "3", "\ud800", [], ["a"], {"a": 1}]
WEIRD = TYPES + [False, 0, 1, 3, 2**31, -(2**64), 10**30, 1.5, -0.0, float("inf"), float("-inf")]
WEIRD += ["", "x" * 300, "\x00", "ünï\u202e", [1], [["a"]], [None], {}]
# Literals that json.dumps never writes, spliced into the body text: an integer of more digits
# than Python converts, and nesting deeper than its recursion limit.
LITERALS = ["9" * 5000, "[" * 5000 + "]" * 5000]
FIELDS = {
    "/api": [
        "prompts",
        "tokens_to_generate",
        "temperature",
        "top_k",
        "top_p",
        "logprobs",
        "random_seed",
        "add_BOS",
        "stop_on_eol",
        "stop_on_double_eol",
        "stop_strings",
        "beam_width",
        "unknown",
    ],
    "/v1/completions": [
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "best_of",
        "seed",
        "logprobs",
        "stop",
        "echo",
        "stream",
        "ignore_eos",
        "model",
        "unknown",
    ],
}
BASE = {
    "/api": {"prompts": ["fuzz"], "tokens_to_generate": 3, "random_seed": 1},
    "/v1/completions": {"prompt": "fuzz", "max_tokens": 3, "seed": 1},
}
METHOD = {"/api": "PUT", "/v1/completions": "POST"}


def http_request(
    method: str, path: str, body: bytes, headers: dict[str, str] | None = None
) -> bytes:
    hdrs = {
        "Host": "x",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {TOKEN}",
        "Content-Length": str(len(body)),
    } | (headers or {})
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in hdrs.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def field_cases() -> list[tuple[bytes, bool, bool]]:
    """Every field of both APIs set to a value of every type, and to the literals: (bytes,
    half-close, HEAD)."""
    cases = []
    for path, fields in FIELDS.items():
        for field in fields:
            for value in TYPES:
                body = json.dumps(BASE[path] | {field: value}).encode()
                cases.append((http_request(METHOD[path], path, body), False, False))
            for literal in LITERALS:
                body = json.dumps(BASE[path] | {field: "@"}).replace('"@"', literal).encode()
                cases.append((http_request(METHOD[path], path, body), False, False))
    return cases


def random_cases(rng: random.Random, count: int) -> list[tuple[bytes, bool, bool]]:
    """Random methods, paths, headers and bodies, and random bytes."""
    methods = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"]
    methods += ["get", "BREW", "M" * 300]
    paths = ["/health", "/api", "/v1/completions", "/", "/nope", "/api?x=1", "//api", "*"]
    paths += ["/v1/completions/", "/%00", "/\xe9", "/" + "a" * 70000, "/api/../health"]
    cases = []
    for _ in range(count):
        kind = rng.randrange(6)
        if kind == 0:  # random bytes on the socket
            data = rng.randbytes(rng.randrange(1, 400))
            cases.append((data, True, False))
            continue
        path = rng.choice(paths)
        method = rng.choice(methods)
        if kind == 1:  # a plausible body for the path, a field or two made strange
            api = path if path in BASE else rng.choice(list(BASE))
            body_obj = dict(BASE[api])
            for field in rng.sample(FIELDS[api], rng.randrange(1, 3)):
                body_obj[field] = rng.choice(WEIRD)
            body = json.dumps(body_obj).encode()
        elif kind == 2:  # malformed: truncated, not UTF-8, UTF-16, too deep, not an object
            good = json.dumps(BASE["/api"]).encode()
            body = rng.choice(
                [
                    good[: rng.randrange(len(good))],
                    b"\xff\xfe\x00" + good,
                    good.decode().encode("utf-16"),
                    b"[" * 12000,
                    b'{"prompts": ' + b"[" * 3000 + b"]" * 3000 + b"}",
                    b"[1, 2]",
                    b'"text"',
                    b"null",
                    rng.randbytes(64),
                ]
            )
        else:
            body = rng.choice([b"", b"{}", json.dumps(BASE["/v1/completions"]).encode()])
        headers: dict[str, str | None] = {}
        half_close = False
        for _ in range(rng.randrange(4)):
            change = rng.randrange(9)
            if change == 0:  # the declared length too long: the client then stops sending
                headers["Content-Length"] = str(len(body) + rng.randrange(1, 50))
                half_close = True
            elif change == 1:  # too short: the rest is read as the next request
                headers["Content-Length"] = str(max(0, len(body) - rng.randrange(1, 10)))
            elif change == 2:
                headers["Content-Length"] = rng.choice(
                    ["-1", "x", "1e3", "", " 5", "0x10", "\u00b2", "9" * 5000, str(10**30)]
                )
            elif change == 3:
                headers["Content-Type"] = rng.choice(["text/plain", "", "application/JSON; x"])
            elif change == 4:
                headers["Authorization"] = rng.choice([None, "Bearer nope", "Bearer \xe9", "x"])
            elif change == 5:
                headers["Transfer-Encoding"] = "chunked"
            elif change == 6:
                headers["Expect"] = "100-continue"
            elif change == 7:
                headers["Connection"] = rng.choice(["close", "keep-alive", "upgrade"])
            else:
                headers[rng.choice(["X-Long", "X-Many", "Bad Header"])] = "v" * rng.choice(
                    [10, 70000]
                )
        data = http_request(method, path, body, headers)
        if rng.random() < 0.05:  # too many headers
            data = data.replace(b"\r\n\r\n", b"".join(b"\r\nX-%d: y" % i for i in range(120)), 1)
            data = data.replace(b"X-119: y", b"X-119: y\r\n\r\n", 1)
        if rng.random() < 0.05:  # another protocol version, or none
            version = rng.choice([b"HTTP/2.0", b"HTTP/1.1.1", b"HTTPS/1.1", b"HTTP/0.9", b""])
            data = data.replace(b"HTTP/1.1", version, 1)
        cases.append((data, half_close, method == "HEAD"))
    return cases


def test_fuzzed_requests_get_json_below_500(server):
    rng = random.Random(18)
    cases = field_cases() + random_cases(rng, 300)
    statuses: dict[int, int] = {}
    for i, (data, half_close, head) in enumerate(cases):
        answer = raw(server.port, data, half_close, head)
        first_line = data.split(b"\n", 1)[0].decode("latin-1")
        if not answer and not first_line.split():
            continue  # a blank first line: the server closes without a word, as it may
        try:
            status, _, documents = parse(answer, head)
        except Exception as e:
            raise AssertionError(f"case {i}: {data[:200]!r} -> {answer[:300]!r}") from e
        assert status < 500, (i, data[:300], documents)
        assert all(isinstance(d, dict) for d in documents), (i, documents)
        statuses[status] = statuses.get(status, 0) + 1
    assert len(cases) > 500 and statuses.get(200) and statuses.get(400) and statuses.get(405)
    assert server.health()["status"] == "ok"
    log = server.log.read_text()
    served = log[log.index("warm-up took") :]  # before it, /health answered 503 "starting"
    assert "Traceback" not in log and not re.search(r" 5\d\d \d+ ms", served), log[-3000:]


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN, as a killed client or a proxy may."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_reset_connection_is_one_line_in_the_log(server):
    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", server.port), timeout=60)

    def generate(stream: bool) -> bytes:
        body = {"prompt": "x", "max_tokens": 3000, "ignore_eos": True, "stream": stream}
        return http_request("POST", "/v1/completions", json.dumps(body).encode())

    def mid_headers(sock):
        sock.sendall(b"PUT /api HTTP/1.1\r\nHost: x\r\n")

    def mid_body(sock):
        sock.sendall(http_request("PUT", "/api", json.dumps(BASE["/api"]).encode())[:-5])

    def waiting_for_the_answer(sock):
        before = server.health()["active"]
        sock.sendall(generate(False))
        while server.health()["active"] == before:  # it is generating
            time.sleep(0.01)

    def mid_stream(sock):
        sock.sendall(generate(True))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")

    def between_requests(sock):
        sock.sendall(http_request("GET", "/health", b""))
        assert b"200 OK" in sock.recv(4096)

    for scenario in (mid_headers, mid_body, waiting_for_the_answer, mid_stream, between_requests):
        start = len(server.log.read_text())
        sock = connect()
        scenario(sock)
        time.sleep(0.1)  # the server is now waiting on the socket (or writing to it)
        reset(sock)
        deadline = time.monotonic() + 60
        while "client gone" not in (new := server.log.read_text()[start:]):
            assert time.monotonic() < deadline, new
            time.sleep(0.05)
        # Every line the scenario wrote is in by the time a later request's line is.
        marker = f"/after-{scenario.__name__}"
        server.call("GET", marker, token=None)
        while marker not in (new := server.log.read_text()[start:]):
            time.sleep(0.05)
        lines = [line for line in new.splitlines() if marker not in line and "/health" not in line]
        assert len(lines) == 1, (scenario.__name__, new)
        assert re.search("client gone .*(connection reset|broken pipe)", lines[0]), lines
    assert "Traceback" not in server.log.read_text()
