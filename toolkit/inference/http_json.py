"""The standard library's HTTP/1.1 request handler, made to answer an API's clients in JSON.

By default `BaseHTTPRequestHandler` answers a method it has no `do_*` function for with an HTML
501, its own refusals (a malformed request line or headers) with HTML pages, a request without a
version with a bare HTTP/0.9 body, and leaves a traceback in the log whenever a client resets its
connection. Here every answer is JSON with a status line, and a client that goes away is one log
line. Subclasses route every method through `_dispatch` and answer through `_json` / `_error`.
"""

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client closed or reset the connection while we were answering (the message says
    how, for the log)."""


def gone(e: BaseException) -> str:
    """How a client left, in a few words for the log."""
    if isinstance(e, ClientGone):
        return str(e)
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, BrokenPipeError):
        return "broken pipe"
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}"


class JSONRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 600  # seconds a socket may stay silent: idle keep-alives and stuck readers end
    status = 0  # of the answer being written, for the log line
    note = ""  # what the log line adds about the request
    # A body that nothing read would be taken for the next request: answer, then close.
    body_unread = False

    def _dispatch(self) -> None:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        # Every method, known or not, goes through _dispatch: the base class answers a method
        # that has no do_* function with an HTML 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, ClientGone) as e:  # between requests, or inside the headers
            log.info("%s client gone (%s) before a whole request", self._peer(), gone(e))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs one line per request, with what it learnt

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self._peer(), format % args)

    def _peer(self) -> str:
        host, port = self.client_address[:2]
        return f"{host}:{port}"

    def send_response_only(self, code: int, message: str | None = None) -> None:
        # An HTTP/0.9 request (no version, or that one) would get a bare body, which no client
        # today reads: every answer has a status line and headers.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        super().send_response_only(code, message)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own refusals (a malformed request line or headers) as JSON too."""
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            # The client's choice of protocol is its error; a 5xx says this server failed.
            code, message = HTTPStatus.BAD_REQUEST, f"{message}: send HTTP/1.1"
        self.close_connection = True
        self.status, self.note = 0, ""
        self._error(code, "request", message or HTTPStatus(code).phrase)
        log.info("%s %r %d%s", self._peer(), self.requestline[:200], code, self.note)

    def _json(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.status = status
        if self.body_unread:
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            if self.command != "HEAD":  # HEAD: GET's headers, no body
                self.wfile.write(data)
        except OSError as e:
            raise ClientGone(gone(e)) from None

    def _error(
        self, status: int, field: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        self.note += f" error: {message}"
        self._json(status, self._error_payload(status, field, message), headers)

    def _error_payload(self, status: int, field: str, message: str) -> dict[str, Any]:
        return {"message": message, "field": field}
