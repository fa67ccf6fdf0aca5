"""The text-generation HTTP server: standard-library threads in front of one engine thread.

Each HTTP connection gets a thread that validates the body, hands engine requests to the engine
thread through a queue and waits for their tokens (a queue per HTTP request, filled by the engine
thread's callback). The engine never touches a socket, so a slow or vanished client cannot stall
the batch; a streaming client that goes away has its requests cancelled and their slots freed.
"""

import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from toolkit.inference import api
from toolkit.inference.engine import Engine, Request

log = logging.getLogger(__name__)


class EngineThread(threading.Thread):
    """Owns the engine: takes new requests from a queue, steps while there is work."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(name="engine", daemon=True)
        self.engine = engine
        self.inbox: queue.Queue[Request | None] = queue.Queue()
        self.running = True

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
    ) -> None:
        super().__init__(address, Handler)
        self.engine_thread = EngineThread(engine)
        self.engine = engine
        self.model_name = model_name
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.log_prompts = log_prompts
        self.limits = api.Limits(max_len=engine.max_len)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.engine_thread.start()
        try:
            super().serve_forever(poll_interval)
        finally:
            self.engine_thread.stop()


class ClientGone(Exception):
    """The client closed the connection while we were answering."""


class Unauthorized(Exception):
    """The server wants a bearer token and the request did not bring it."""


class Handler(BaseHTTPRequestHandler):
    server: GenerationServer
    protocol_version = "HTTP/1.1"
    timeout = 600  # seconds a socket may stay silent: idle keep-alives and stuck readers end

    def do_GET(self) -> None:
        self._dispatch({"/health": self._health})

    def do_PUT(self) -> None:
        self._dispatch({"/api": self._megatron})

    def do_POST(self) -> None:
        self._dispatch({"/v1/completions": self._completions})

    def do_DELETE(self) -> None:  # JSON 405/404 rather than the base class's HTML 501
        self._dispatch({})

    do_PATCH = do_DELETE

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs one line per request, with what it learnt

    def _dispatch(self, routes: dict[str, Any]) -> None:
        start = time.perf_counter()
        self.status, self.note = 0, ""
        path = self.path.split("?", 1)[0]
        try:
            if path not in routes:
                known = path in ("/health", "/api", "/v1/completions")
                code = HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND
                self.close_connection = True  # the body, if any, is left unread
                self._error(code, path, f"{self.command} {path} is not served here")
            else:
                routes[path]()
        except ClientGone:
            self.close_connection = True
        except Unauthorized:
            self._error(
                HTTPStatus.UNAUTHORIZED, "Authorization", "a valid bearer token is required"
            )
        except api.BadRequest as e:
            self._error(HTTPStatus.BAD_REQUEST, e.field, str(e))
        except Exception as e:
            log.exception("request failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "", f"{type(e).__name__}: {e}")
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

    def _health(self) -> None:
        engine = self.server.engine
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
            },
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
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise api.BadRequest("Content-Length", "a Content-Length header is required") from None
        if not 0 <= length <= self.server.max_body_bytes:
            self.close_connection = True
            raise api.BadRequest(
                "Content-Length",
                f"the body is {length} bytes, over the limit of {self.server.max_body_bytes}",
            )
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise api.BadRequest("body", f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise api.BadRequest("body", "the body must be a JSON object")
        return body

    def _submit(self, requests: list[Request]) -> "queue.SimpleQueue[Request]":
        """Queue the requests; the returned queue receives each request whenever it changes."""
        updates: queue.SimpleQueue[Request] = queue.SimpleQueue()
        for r in requests:
            r.on_update = updates.put
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

    def _wait(self, requests: list[Request], updates: "queue.SimpleQueue[Request]") -> None:
        check = time.monotonic()
        while not all(r.done for r in requests):
            try:
                updates.get(timeout=0.5)
            except queue.Empty:
                pass
            if time.monotonic() - check > 0.5:  # updates come every step: check on a clock
                check = time.monotonic()
                if self._client_gone():
                    for r in requests:
                        r.cancel()
                    self.note += " client gone: cancelled"
                    raise ClientGone
        self.note += f" generated={sum(len(r.tokens) for r in requests)}"
        failed = [r.error for r in requests if r.finish_reason == "error"]
        if failed:
            raise RuntimeError(failed[0])

    def _client_gone(self) -> bool:
        """Whether the peer closed its end (it sends nothing more while it waits for us)."""
        if not select.select([self.connection], [], [], 0)[0]:
            return False
        try:
            return not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _megatron(self) -> None:
        tokenizer = self.server.engine.tokenizer
        requests = api.parse_megatron(self._body(), tokenizer, self.server.limits)
        self._wait(requests, self._submit(requests))
        self._json(HTTPStatus.OK, api.megatron_response(requests, tokenizer))

    def _completions(self) -> None:
        tokenizer, name = self.server.engine.tokenizer, self.server.model_name
        c = api.parse_completion(self._body(), tokenizer, self.server.limits)
        updates = self._submit(c.requests)
        if not c.stream:
            self._wait(c.requests, updates)
            return self._json(HTTPStatus.OK, api.completion_response(c, tokenizer, name))
        self._stream(c, updates)

    def _stream(self, c: api.Completion, updates: "queue.SimpleQueue[Request]") -> None:
        """Server-sent events: text deltas per choice as tokens arrive, then `data: [DONE]`."""
        tokenizer, name = self.server.engine.tokenizer, self.server.model_name
        self.status = HTTPStatus.OK
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.close_connection = True
        index = {id(r): i for i, r in enumerate(c.requests)}
        sent_text = [0] * len(c.requests)
        sent_tokens = [0] * len(c.requests)
        finished: set[int] = set()
        try:
            if c.echo:
                for i, r in enumerate(c.requests):
                    self._event(
                        api.completion_chunk(c, name, i, tokenizer.decode(r.prompt), None, None)
                    )
            while len(finished) < len(c.requests):
                r = updates.get()
                i = index[id(r)]
                if i in finished:
                    continue
                done = r.done  # read once: the engine thread may finish it meanwhile
                text = api.generated_text(r, tokenizer, final=done)
                n = len(r.tokens)
                logprobs = None
                if c.logprobs:
                    offset = sent_text[i]
                    logprobs = api.completion_logprobs(
                        r, tokenizer, range(sent_tokens[i], n), False, offset
                    )
                reason = api.finish_reason(r) if done else None
                if text[sent_text[i] :] or reason or (logprobs and n > sent_tokens[i]):
                    self._event(
                        api.completion_chunk(c, name, i, text[sent_text[i] :], logprobs, reason)
                    )
                sent_text[i], sent_tokens[i] = len(text), n
                if done:
                    finished.add(i)
                    if r.finish_reason == "error":
                        self._event({"error": {"message": r.error, "type": "server_error"}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # reset, broken pipe, or a client that stopped reading (timeout)
            for r in c.requests:
                r.cancel()
            self.note += " client gone: cancelled"
            raise ClientGone from None
        finally:
            self.note += f" generated={sum(len(r.tokens) for r in c.requests)} stream"

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", "Bearer")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            raise ClientGone from None

    def _error(self, status: int, field: str, message: str) -> None:
        """OpenAI's error object on /v1 paths, the reference client's `message` elsewhere."""
        if self.path.startswith("/v1/"):
            kind = "invalid_request_error" if status < 500 else "server_error"
            payload = {"error": {"message": message, "type": kind, "param": field, "code": None}}
        else:
            payload = {"message": message, "field": field}
        self.note += f" error: {message}"
        self._json(status, payload)
