"""The text-generation HTTP server: standard-library threads in front of one engine thread.

Each HTTP connection gets a thread that validates the body, hands engine requests to the engine
thread through a queue and waits for their tokens (a queue per HTTP request, filled by the engine
thread's callback). The engine never touches a socket, so a slow or vanished client cannot stall
the batch; a streaming client that goes away has its requests cancelled and their slots freed.
"""

import hmac
import itertools
import json
import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any

from toolkit.inference import api
from toolkit.inference.chat_template import ChatTemplate
from toolkit.inference.engine import Engine, Request
from toolkit.inference.http_json import ClientGone, JSONRequestHandler, gone

log = logging.getLogger(__name__)

# Streams' HTTP threads woken per decode step, about, at most: each wake costs the engine thread
# the GIL for ~0.15 ms of the thread's work (benchmarks/serve_host.py).
STREAM_WAKES = 8


class Updates:
    """How the engine thread wakes one HTTP request's thread (the requests' on_update): when
    one of its requests finished, or for streams (`every`) when one changed, with at most one
    wake pending. Woken, the thread reads every request of its own: a thread with several
    prompts, or one that fell behind, is woken once for all that is new, not once per request
    and step (each wake takes the GIL from the engine thread).

    Streams share a budget of wakes per step (the server's `stream_wakes`): with n streams
    getting tokens, each is woken every ceil(n / budget) steps, at a step of its own phase so
    that the wakes spread evenly over the steps, and always for its first token and its end.
    A stream alone, or among at most `budget`, is woken at every step."""

    def __init__(self, server: "GenerationServer", every: bool) -> None:
        self.server, self.every = server, every
        self.queue: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.pending = False
        self.phase = next(server.stream_phases)  # itertools.count: safe from any thread
        self.step = -1  # the last engine step that updated one of its requests

    def __call__(self, r: Request) -> None:
        due = r.done
        if self.every and not due:
            step = self.server.engine.steps
            if self.step != step:  # this stream's first update of the step: count it
                self.step = step
                self.server.count_stream(step)
            interval = self.server.stream_interval()
            due = interval == 1 or (step + self.phase) % interval == 0 or len(r.tokens) == 1
        if due and not self.pending:
            self.pending = True
            self.server.wakes += 1  # only the engine thread writes it
            self.queue.put(None)

    def get(self, timeout: float | None = None) -> None:
        """Wait for a wake (queue.Empty after `timeout`), then let the next change wake again:
        what changed before this returns is there to read."""
        self.queue.get(timeout=timeout)
        self.pending = False


class EngineThread(threading.Thread):
    """Owns the engine: warms it up (`warm_up`, while the HTTP threads already answer that the
    server is starting), then takes new requests from a queue and steps while there is work."""

    def __init__(
        self,
        engine: Engine,
        warm_up: Callable[[], Any] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="engine", daemon=True)
        self.engine = engine
        self.inbox: queue.Queue[Request | None] = queue.Queue()
        self.running = True
        self.warm_up = warm_up
        self.on_failure = on_failure  # called (in a thread of its own) when warm-up fails
        self.ready = threading.Event()  # set once warm: requests are taken from then on
        self.failed: str | None = None  # why warm-up failed

    def warm(self) -> bool:
        """Run the warm-up, then say ready; False (and `failed` says why) if it raised."""
        try:
            if self.warm_up is not None:
                self.warm_up()
        except Exception as e:
            log.exception("warm-up failed: the server stops")
            self.failed = f"warm-up failed: {type(e).__name__}: {e}"
            if self.on_failure is not None:
                threading.Thread(target=self.on_failure, daemon=True).start()
            return False
        self.ready.set()
        return True

    def submit(self, requests: list[Request]) -> None:
        for r in requests:
            self.engine.check(r)  # raises before anything is queued
        for r in requests:
            self.inbox.put(r)

    def stop(self) -> None:
        self.running = False
        self.inbox.put(None)

    def _add(self, r: Request) -> None:
        try:
            self.engine.add(r)
        except Exception as e:  # submit() checked it: this is our failure, not the client's
            log.exception("could not queue a request")
            r.error, r.finish_reason = f"{type(e).__name__}: {e}", "error"
            if r.on_update is not None:
                r.on_update(r)

    def _take(self, idle_timeout: float | None = None) -> None:
        """Queue what the HTTP threads sent; wait for it only while idle (at most
        `idle_timeout` seconds; None: until something arrives)."""
        try:
            item = self.inbox.get(block=not self.engine.has_work(), timeout=idle_timeout)
            while True:
                if item is not None:
                    self._add(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def run(self) -> None:
        if not self.warm():
            return
        while self.running:
            self._take()
            if not self.engine.has_work():
                continue
            try:
                self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self.engine.fail_all(f"generation failed: {type(e).__name__}: {e}")


class GenerationServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many clients connect at once; the default backlog is 5

    def __init__(
        self,
        address: tuple[str, int],
        engine: Engine,
        *,
        model_name: str = "model",
        token: str | None = None,
        max_body_bytes: int = 1 << 20,
        log_prompts: bool = False,
        warm_up: Callable[[], Any] | None = None,
        stream_wakes: int = STREAM_WAKES,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        """Listens at once; `warm_up` (None: the engine's own) runs on the engine thread when
        serving starts, and until it returns /health answers 503 "starting" and generation
        requests 503. `stream_wakes`: streams' threads woken per decode step, about, at most
        (see Updates; 0: every stream at every step). `chat_template`: the model's own, for
        the chat endpoint (None: Megatron's template for pretrained models)."""
        super().__init__(address, Handler)
        self.warm_up = engine.warm_up if warm_up is None else warm_up
        self.engine_thread = EngineThread(engine, self.warm_up, on_failure=self.shutdown)
        self.engine = engine
        self.model_name = model_name
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.log_prompts = log_prompts
        self.chat_template = chat_template
        self.limits = api.Limits(max_len=engine.max_len)
        self.wakes = 0  # HTTP threads handed an update (woken) by the engine thread
        self.stream_wakes = stream_wakes
        self.stream_phases = itertools.count()
        # Streams updated by the engine's last step and by its current one (engine thread only).
        self.streams_last = self.streams_now = 0
        self.streams_step = -1

    def count_stream(self, step: int) -> None:
        """One more stream updated at engine step `step` (from the engine thread)."""
        if step != self.streams_step:
            self.streams_step = step
            self.streams_last, self.streams_now = self.streams_now, 0
        self.streams_now += 1

    def stream_interval(self) -> int:
        """Every how many steps a stream is woken: its share of the wakes' budget."""
        if self.stream_wakes <= 0:
            return 1
        streams = max(self.streams_last, self.streams_now)
        return max(1, -(-streams // self.stream_wakes))

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.engine_thread.start()
        try:
            super().serve_forever(poll_interval)
        finally:
            self.engine_thread.stop()


class Starting(Exception):
    """A generation request before the engine is warm (or after its warm-up failed)."""


class Unauthorized(Exception):
    """The server wants a bearer token and the request did not bring it."""


class NotServed(Exception):
    """No such path (404), or not with this method (405, with the methods that are)."""

    def __init__(self, status: int, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.status, self.allow = status, allow


# Path -> {method: handler}. HEAD is answered wherever GET is, OPTIONS everywhere.
ROUTES = {
    "/health": {"GET": "_health"},
    "/api": {"PUT": "_megatron"},
    "/v1/completions": {"POST": "_completions"},
    "/completions": {"POST": "_completions"},  # Megatron's own server answers here too
    "/v1/chat/completions": {"POST": "_chat"},
    "/chat/completions": {"POST": "_chat"},
}
# Paths outside /v1/ whose errors are OpenAI's error object, as those under /v1/ (the others':
# the reference client's).
OPENAI_ALIASES = ("/completions", "/chat/completions")


def allowed(path: str) -> str:
    """The Allow header of a route."""
    methods = list(ROUTES[path])
    return ", ".join(methods + (["HEAD"] if "GET" in methods else []) + ["OPTIONS"])


class Handler(JSONRequestHandler):
    server: GenerationServer

    def _dispatch(self) -> None:
        start = time.perf_counter()
        self.status, self.note = 0, ""
        path = self.path.split("?", 1)[0]
        length = self.headers.get("Content-Length", "").strip()
        self.body_unread = "Transfer-Encoding" in self.headers or length not in ("", "0")
        try:
            try:
                self._route(path)
            except NotServed as e:
                headers = {"Allow": e.allow} if e.allow else {}
                self._error(e.status, path, str(e), headers)
            except Starting as e:
                # Retry-After: a client that honours it comes back when warm-up may be over.
                headers = {"Retry-After": "1"}
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "", str(e), headers)
            except Unauthorized:
                headers = {"WWW-Authenticate": "Bearer"}
                message = "a valid bearer token is required"
                self._error(HTTPStatus.UNAUTHORIZED, "Authorization", message, headers)
            except api.BadRequest as e:
                self._error(HTTPStatus.BAD_REQUEST, e.field, str(e))
            except ClientGone:
                raise
            except Exception as e:
                log.exception("request failed")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "", f"{type(e).__name__}: {e}")
        except ClientGone as e:  # one line in the log, not a traceback
            self.close_connection = True
            self.note += f" client gone ({e})"
        finally:
            log.info(
                "%s %s %s %d %.0f ms%s",
                self.client_address[0],
                self.command,
                path,
                self.status,
                1000 * (time.perf_counter() - start),
                self.note,
            )

    def _route(self, path: str) -> None:
        methods = ROUTES.get(path)
        if methods is None:
            raise NotServed(HTTPStatus.NOT_FOUND, f"{path} is not served here")
        name = methods.get("GET" if self.command == "HEAD" else self.command)
        if self.command == "OPTIONS":
            self._json(
                HTTPStatus.OK, {"allow": allowed(path).split(", ")}, {"Allow": allowed(path)}
            )
        elif name is None:
            message = f"{self.command} {path} is not served here: use {allowed(path)}"
            raise NotServed(HTTPStatus.METHOD_NOT_ALLOWED, message, allowed(path))
        else:
            getattr(self, name)()

    def _health(self) -> None:
        engine, thread = self.server.engine, self.server.engine_thread
        if not thread.ready.is_set():  # 503 until warm: load balancers and clients wait
            status = "failed" if thread.failed else "starting"
            body = {"status": status, "model": self.server.model_name}
            if thread.failed:
                body["error"] = thread.failed
            return self._json(HTTPStatus.SERVICE_UNAVAILABLE, body, {"Retry-After": "1"})
        self._json(
            HTTPStatus.OK,
            {
                "status": "ok",
                "model": self.server.model_name,
                "slots": engine.slots,
                "max_len": engine.max_len,
                "active": len(engine.active),
                "waiting": len(engine.waiting),
                **engine.stats,
                # list(): one call under the GIL, while the engine thread may add a batch
                "decode_by_batch": {
                    str(b): dict(d) for b, d in list(engine.decode_by_batch.items())
                },
                "wakes": self.server.wakes,
            },
        )

    def _check_ready(self) -> None:
        thread = self.server.engine_thread
        if not thread.ready.is_set():
            raise Starting(
                thread.failed
                or "the server is starting (warming up: recording decode graphs, tuning "
                "kernels); retry when GET /health answers 200"
            )

    def _body(self) -> dict[str, Any]:
        """The JSON object in the body, after the checks that need no body."""
        token = self.server.token
        if token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self.close_connection = True
                raise Unauthorized
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            self.close_connection = True
            raise api.BadRequest(
                "Content-Type", f"Content-Type must be application/json, not {kind!r}"
            )
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise api.BadRequest("Transfer-Encoding", "send the body with a Content-Length")
        lengths = self.headers.get_all("Content-Length", [])
        length = lengths[0].strip() if len(lengths) == 1 else ""
        if not (length.isascii() and length.isdigit()):
            self.close_connection = True
            raise api.BadRequest(
                "Content-Length", "one Content-Length header with a whole number is required"
            )
        limit = self.server.max_body_bytes
        if len(length) > 18 or int(length) > limit:  # (int() refuses over 4300 digits)
            self.close_connection = True
            raise api.BadRequest(
                "Content-Length", f"the body is {length[:30]} bytes, over the limit of {limit}"
            )
        length = int(length)
        try:
            raw = self.rfile.read(length)
        except OSError as e:
            raise ClientGone(f"{gone(e)} while reading the body") from None
        self.body_unread = False
        if len(raw) < length:  # the client stopped sending (it shut its side down)
            self.close_connection = True
            raise api.BadRequest(
                "Content-Length", f"the body ended after {len(raw)} of {length} bytes"
            )
        try:
            body = json.loads(raw)
        # ValueError: invalid UTF-8 or JSON, or an integer of more digits than Python converts.
        except (ValueError, RecursionError) as e:
            raise api.BadRequest("body", f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise api.BadRequest("body", "the body must be a JSON object")
        return body

    def _submit(self, requests: list[Request], *, every_token: bool = False) -> Updates:
        """Queue the requests; the returned Updates wakes this thread when one is done, or with
        `every_token` (streams) whenever one changes. A waiting thread woken at every step
        takes the GIL from the engine's thread as often: with tens of clients that slowed every
        step, so whole answers wake their thread once."""
        updates = Updates(self.server, every_token)
        for r in requests:
            r.on_update = updates
        try:
            self.server.engine_thread.submit(requests)
        except ValueError as e:  # the API checks should have caught it; still the client's fault
            raise api.BadRequest("prompts", str(e)) from None
        self.note = f" prompts={len(requests)} prompt_tokens={sum(len(r.prompt) for r in requests)}"
        if self.server.log_prompts:
            self.note += (
                f" text={[self.server.engine.tokenizer.decode(r.prompt) for r in requests]}"
            )
        return updates

    def _wait(self, requests: list[Request], updates: Updates) -> None:
        check = time.monotonic()
        while not all(r.done for r in requests):
            try:
                updates.get(timeout=0.5)
            except queue.Empty:
                pass
            if time.monotonic() - check > 0.5:  # a long answer: check on a clock
                check = time.monotonic()
                if how := self._client_gone():
                    for r in requests:
                        r.cancel()
                    self.note += " cancelled"
                    raise ClientGone(how)
        self.note += f" generated={sum(len(r.tokens) for r in requests)}"
        failed = [r.error for r in requests if r.finish_reason == "error"]
        if failed:
            raise RuntimeError(failed[0])

    def _client_gone(self) -> str | None:
        """How the peer left, if it closed its end (it sends nothing more while it waits)."""
        readable = select.poll()  # not select(): with many clients descriptors pass 1024
        readable.register(self.connection, select.POLLIN)
        if not readable.poll(0):
            return None
        try:
            return None if self.connection.recv(1, socket.MSG_PEEK) else "closed"
        except OSError as e:
            return gone(e)

    def _megatron(self) -> None:
        self._check_ready()
        tokenizer = self.server.engine.tokenizer
        requests = api.parse_megatron(self._body(), tokenizer, self.server.limits)
        self._wait(requests, self._submit(requests))
        self._json(HTTPStatus.OK, api.megatron_response(requests, tokenizer))

    def _completions(self, parse=api.parse_completion, respond=api.completion_response) -> None:
        self._check_ready()
        tokenizer, name = self.server.engine.tokenizer, self.server.model_name
        c = parse(self._body(), tokenizer, self.server.limits)
        updates = self._submit(c.requests, every_token=c.stream)
        if not c.stream:
            self._wait(c.requests, updates)
            return self._json(HTTPStatus.OK, respond(c, tokenizer, name))
        self._stream(c, updates)

    def _chat(self) -> None:
        """OpenAI's chat completions: the messages as one prompt (api.parse_chat)."""
        parse = partial(api.parse_chat, template=self.server.chat_template)
        self._completions(parse, api.chat_response)

    def _stream(self, c: api.Completion, updates: Updates) -> None:
        """Server-sent events: text deltas per choice as tokens arrive, then `data: [DONE]`."""
        tokenizer, name = self.server.engine.tokenizer, self.server.model_name
        self.status = HTTPStatus.OK
        self.close_connection = True
        sent = [[0, 0] for _ in c.requests]  # per choice: characters and tokens sent
        finished: set[int] = set()
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the body ends when the connection does
            self.end_headers()
            if c.echo:
                for i, r in enumerate(c.requests):
                    self._event(
                        api.completion_chunk(c, name, i, tokenizer.decode(r.prompt), None, None)
                    )
            if c.chat:
                for i in range(len(c.requests)):
                    self._event(api.chat_role_chunk(c, name, i))
            while len(finished) < len(c.requests):
                updates.get()
                for i, r in enumerate(c.requests):
                    if i not in finished and self._stream_news(c, i, r, sent[i]):
                        finished.add(i)
            if c.include_usage:
                self._event(api.usage_chunk(c, name))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError as e:  # reset, broken pipe, or a client that stopped reading (timeout)
            for r in c.requests:
                r.cancel()
            self.note += " cancelled"
            raise ClientGone(gone(e)) from None
        finally:
            self.note += f" generated={sum(len(r.tokens) for r in c.requests)} stream"

    def _stream_news(self, c: api.Completion, i: int, r: Request, sent: list[int]) -> bool:
        """The event of choice `i` for what it got since `sent` (characters, tokens; updated);
        True once it is done."""
        done = r.done  # read once: the engine thread may finish it meanwhile
        if not done and len(r.tokens) == sent[1]:
            return False  # nothing new (a wake for another choice)
        tokenizer, name = self.server.engine.tokenizer, self.server.model_name
        text = api.generated_text(r, tokenizer, final=done)
        n = len(r.tokens)
        logprobs = None
        if c.logprobs and c.chat:
            logprobs = api.chat_logprobs(r, tokenizer, range(sent[1], n))
        elif c.logprobs:
            logprobs = api.completion_logprobs(r, tokenizer, range(sent[1], n), False, sent[0])
        reason = api.finish_reason(r) if done else None
        if text[sent[0] :] or reason or (logprobs and n > sent[1]):
            self._event(api.completion_chunk(c, name, i, text[sent[0] :], logprobs, reason))
        sent[:] = len(text), n
        if done and r.finish_reason == "error":
            self._event({"error": {"message": r.error, "type": "server_error"}})
        return done

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _error_payload(self, status: int, field: str, message: str) -> dict[str, Any]:
        """OpenAI's error object on /v1/* and OPENAI_ALIASES, the reference client's `message`
        elsewhere."""
        path = getattr(self, "path", "").split("?", 1)[0]
        if path.startswith("/v1/") or path in OPENAI_ALIASES:
            kind = "invalid_request_error" if status < 500 else "server_error"
            return {"error": {"message": message, "type": kind, "param": field, "code": None}}
        return super()._error_payload(status, field, message)
