"""The API server's gunicorn worker class: gevent, serving HTTP with gevent's own
``pywsgi`` handler (gunicorn's ``gevent_pywsgi``), reading requests through llhttp
(``httptools``) under deadlines and a body limit.

Why gevent: the gateway mostly waits on engines, and one greenlet per connection holds
thousands of concurrent streams in one process, where gthread needs a thread each.
Why pywsgi rather than gunicorn's ``gevent`` worker: on the 2-core benchmark machine it
spent 15-20% less CPU per proxied request (gunicorn's pure-Python request parser and
response writer cost more, and it writes headers and the first body bytes in separate
sends), and CPU per request is what bounds the gateway's throughput there
(``bench/gateway.py --worker-class``; README, Benchmarks).

What this changes in pywsgi:

* Requests are read by ``RequestReader``: llhttp (Node.js's parser, fuzzed upstream;
  the one uvicorn uses) does the request line, headers and body framing, and refuses
  what RFC 9112 calls ambiguous: Content-Length with Transfer-Encoding, duplicate or
  non-digit Content-Length, a Transfer-Encoding that does not end in ``chunked``, bare
  CR or LF, obsolete line folding, bad chunk sizes and extensions. On top of llhttp we
  refuse any transfer coding other than exactly ``chunked``, Transfer-Encoding in
  HTTP/1.0, HTTP/0.9 and 2+, and more than 100 header fields or 64 KiB of head. Each of
  these is one 400 and a closed connection: after a framing error nothing later on the
  connection can be trusted to be a request. (Before: a hand-written parser that let
  ``Transfer-Encoding: gzip, chunked`` and ``Content-Length: +28`` through.)
* Deadlines: the head must arrive within ``request_head_timeout_s`` of its first byte,
  the body within ``request_body_timeout_s`` of the head; a connection past either is
  answered 408 and closed. Waiting for a keep-alive connection's next request is
  bounded by gunicorn's ``--keep-alive`` (then closed without an answer).
* A body limit, ``max_body_bytes``, for every route: a larger Content-Length is 413
  before any body byte is read; a chunked body is counted as it arrives and is 413 as
  soon as it passes the limit.
* The body is read whole before the application runs (every route here reads it whole
  anyway), so a slow client can hold only its own greenlet, never a request in the
  app, and limit and deadline errors are the server's answers in one place, not
  exceptions inside Flask. A chunked body reaches the app decoded, with its length as
  ``CONTENT_LENGTH``.
* Fewer, cheaper writes: the response head goes out in one write with the first body
  bytes (pywsgi writes them separately), and each write tries one ``send`` before
  falling back to ``sendall`` (gevent's ``sendall`` costs ~4 us more per call; most
  writes fit the socket buffer at once). A relayed SSE stream makes one write per
  piece, so this is most of the per-piece cost that is ours to save.

These hook pywsgi's ``handle_one_request``, ``get_environ``, ``_sendall`` and
``_write_with_headers`` (``tests/integration/test_api_server.py`` and
``test_hostile_clients.py`` exercise them).
"""

from __future__ import annotations

import contextlib
import io
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import httptools
from gevent.pywsgi import OldMessage
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

from app.gateway.routes import openai_error_body
from app.settings import Settings

MAX_HEADER_FIELDS = 100
MAX_HEAD_BYTES = 65536  # request line and headers
MAX_TARGET_BYTES = 8192  # the request target (path and query); longer is 414
RECV_BYTES = 65536
LINGER_S = 1.0  # after an error answer, how long unread input is drained before closing
_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
}


@dataclass(frozen=True)
class Limits:
    """What one request may take: time for its head and body, and body size."""

    head_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    max_body_bytes: int = 32 * 1024 * 1024
    idle_timeout_s: float = 20.0  # the wait for a keep-alive connection's next request


class Rejected(Exception):
    """A request the server answers itself (4xx), then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> bytes:
        body = openai_error_body(self.message, kind="invalid_request_error")
        head = (
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body


class _Request:
    """One request as llhttp reports it."""

    __slots__ = (
        "body",
        "body_bytes",
        "chunked",
        "done",
        "head_done",
        "head_size",
        "headers",
        "target",
    )

    def __init__(self) -> None:
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0  # bytes of header fields so far
        self.head_done = False
        self.chunked = False
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.done = False


@dataclass
class RequestHead:
    method: str
    target: str
    version: str  # "HTTP/1.1"
    headers: list[tuple[str, str]]
    keep_alive: bool
    expect_continue: bool
    chunked: bool


class RequestReader:
    """Reads one connection's requests through llhttp, under ``Limits``.

    Bytes are received only while the current request needs more, so at most one
    receive (64 KiB) of pipelined requests waits parsed ahead. Parser callbacks run
    inside ``feed_data`` and raise ``Rejected`` to stop it at the first violation.
    """

    def __init__(self, sock: Any, limits: Limits) -> None:
        self.sock = sock
        self.limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[_Request] = deque()
        self._error: Rejected | None = None  # the parser is dead past this point
        self._head_bytes = 0
        self._meta: dict[int, tuple[str, str, bool]] = {}  # id -> method, version, keep-alive

    # llhttp callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._queue.append(_Request())
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        req = self._queue[-1]
        req.target += url
        if len(req.target) > MAX_TARGET_BYTES:
            raise Rejected(414, f"the request target is longer than {MAX_TARGET_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._queue[-1]
        if req.head_done:
            return  # a chunked trailer field: not passed on
        if len(req.headers) >= MAX_HEADER_FIELDS:
            raise Rejected(400, f"more than {MAX_HEADER_FIELDS} header fields")
        req.headers.append((name, value))
        # Counted here too: a head that arrives in one receive completes in one feed.
        req.head_size += len(name) + len(value) + 4
        if req.head_size + len(req.target) > MAX_HEAD_BYTES:
            raise Rejected(400, f"the request head is over {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        req = self._queue[-1]
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise Rejected(400, f"HTTP/{version} is not supported: send HTTP/1.1")
        length = -1
        for name, value in req.headers:
            lname = name.lower()
            if lname == b"transfer-encoding":
                # llhttp accepts codings before the final chunked; we decode none.
                if value.strip(b" \t").lower() != b"chunked" or req.chunked:
                    raise Rejected(400, f"unsupported Transfer-Encoding {value[:60]!r}")
                if version == "1.0":
                    raise Rejected(400, "Transfer-Encoding in an HTTP/1.0 request")
                req.chunked = True
            elif lname == b"content-length":
                length = int(value)  # llhttp allows digits only, and one field
        max_body = self.limits.max_body_bytes
        if length > max_body:
            raise Rejected(413, _too_large(max_body))
        self._meta[id(req)] = (
            parser.get_method().decode("latin-1"),
            f"HTTP/{version}",
            parser.should_keep_alive(),
        )
        req.head_done = True  # only now: a refused head is never served

    def on_body(self, data: bytes) -> None:
        req = self._queue[-1]
        req.body_bytes += len(data)
        if req.body_bytes > self.limits.max_body_bytes:
            raise Rejected(413, _too_large(self.limits.max_body_bytes))
        req.body.append(data)

    def on_message_complete(self) -> None:
        self._queue[-1].done = True

    # reading ---------------------------------------------------------------------------
    def _fill(self, deadline: float) -> bool:
        """Receive once (until ``deadline``) and parse; False when the peer closed."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise TimeoutError
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(RECV_BYTES)
        finally:
            self.sock.settimeout(None)
        if not data:
            return False
        queue = self._queue
        if not queue or queue[-1].done or not queue[-1].head_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._error = Rejected(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            mine = exc.__context__
            self._error = mine if isinstance(mine, Rejected) else Rejected(400, f"{exc}")
        if (
            self._error is None
            and queue
            and not queue[-1].head_done
            and (self._head_bytes > MAX_HEAD_BYTES)
        ):
            self._error = Rejected(400, f"the request head is over {MAX_HEAD_BYTES} bytes")
        return True

    def next_head(self) -> tuple[RequestHead, _Request] | None:
        """The next request's head; None when the client closed or stayed idle.
        Raises ``Rejected`` (malformed, too large, past the head deadline)."""
        queue = self._queue
        started = bool(queue)
        limits = self.limits
        deadline = time.monotonic() + (limits.head_timeout_s if started else limits.idle_timeout_s)
        while not (queue and queue[0].head_done):
            if self._error is not None:
                raise self._error
            try:
                if not self._fill(deadline):
                    if queue:
                        raise Rejected(400, "the client closed the connection mid-request")
                    return None
            except TimeoutError:
                if not queue:
                    return None  # idle keep-alive connection: close without an answer
                raise Rejected(
                    408, f"request head not received within {limits.head_timeout_s:g} s"
                ) from None
            if queue and not started:
                started = True
                deadline = time.monotonic() + limits.head_timeout_s
        req = queue[0]
        method, version, keep_alive = self._meta.pop(id(req))
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in req.headers]
        expect = any(n.lower() == "expect" and v.lower() == "100-continue" for n, v in headers)
        head = RequestHead(
            method=method,
            target=req.target.decode("latin-1"),
            version=version,
            headers=headers,
            keep_alive=keep_alive and self._error is None,
            expect_continue=expect,
            chunked=req.chunked,
        )
        return head, req

    def read_body(self, head: RequestHead, req: _Request) -> bytes:
        """The whole (decoded) body; raises ``Rejected`` (framing, size, deadline)."""
        if not req.done and head.expect_continue and head.version == "HTTP/1.1":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        deadline = time.monotonic() + self.limits.body_timeout_s
        while not req.done:
            if self._error is not None:
                raise self._error
            try:
                if not self._fill(deadline):
                    raise Rejected(400, "the client closed the connection mid-body")
            except TimeoutError:
                raise Rejected(
                    408, f"request body not received within {self.limits.body_timeout_s:g} s"
                ) from None
        self._queue.popleft()
        return req.body[0] if len(req.body) == 1 else b"".join(req.body)


def _too_large(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes (SAGELLM_MAX_BODY_MB)"


class _Body(io.BytesIO):
    """``wsgi.input``: the body, already read; pywsgi calls ``_discard`` after a request."""

    def _discard(self) -> None:
        pass


class ApiHandler(PyWSGIHandler):
    limits = Limits()
    _collect: bytearray | None = None  # writes held back to go out as one
    _reader: RequestReader | None = None

    def handle_one_request(self) -> tuple[str, bytes] | bool | None:
        # pywsgi's loop: None ends the connection, True reads the next request, and
        # (status, bytes) is sent as the last answer before closing.
        if self.socket is None:
            return None
        reader = self._reader
        if reader is None:
            reader = self._reader = RequestReader(self.socket, self.limits)
        self.environ = None  # log_request: no record for a request that got no environ
        try:
            got = reader.next_head()
            if got is None:
                return None
            head, req = got
            self._take_head(head)
            body = reader.read_body(head, req)
        except Rejected as rejected:
            self.log_error("%s %s", rejected.status, rejected.message)
            self._reject(rejected)
            return None
        except OSError:  # reset, or gone mid-request: nobody to answer
            return None
        self.response_length = 0
        self._body = body
        self.environ = self.get_environ()
        self.application = self.server.application
        self.handle_one_response()
        if self.close_connection:
            return None
        return True

    def _take_head(self, head: RequestHead) -> None:
        """What pywsgi's ``read_request`` would set, from llhttp's parse."""
        self.command = head.method
        self.path = head.target
        self.request_version = head.version
        self.requestline = f"{head.method} {head.target} {head.version}"
        msg = OldMessage()
        for name, value in head.headers:
            lname = name.lower()
            if lname == "transfer-encoding" or (head.chunked and lname == "content-length"):
                continue  # the body is decoded before the app sees it
            msg[name] = value.strip(" \t")
        self.headers = msg
        self.close_connection = not head.keep_alive

    def _reject(self, rejected: Rejected) -> None:
        """Answer and close; unread input is drained for a moment first, so that the
        client can read the answer (closing with unread bytes resets the connection)."""
        self.status = str(rejected.status)
        sock = self.socket
        with contextlib.suppress(OSError):
            sock.sendall(rejected.response())
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            drained = 0
            while (
                drained < self.limits.max_body_bytes and (left := deadline - time.monotonic()) > 0
            ):
                sock.settimeout(left)
                data = sock.recv(RECV_BYTES)
                if not data:
                    break
                drained += len(data)

    def get_environ(self) -> dict[str, Any]:
        if self.headers.get("Content-Length") is None and self._body:
            self.headers["Content-Length"] = str(len(self._body))
        env: dict[str, Any] = super().get_environ()
        self.wsgi_input = env["wsgi.input"] = _Body(self._body)
        env["wsgi.input_terminated"] = True
        return env

    def _sendall(self, data: bytes | bytearray) -> None:
        if self._collect is not None:
            self._collect += data
        else:
            self._send(data)
        self.response_length += len(data)

    def _send(self, data: bytes | bytearray) -> None:
        try:
            sent = self.socket.send(data)
            if sent < len(data):
                self.socket.sendall(memoryview(data)[sent:])
        except OSError as exc:  # pywsgi's bookkeeping for its log, then the same error
            self.status = f"socket error: {exc}"
            code: int = getattr(self, "code", 0) or 0
            if code > 0:
                self.code = -code
            raise

    def log_request(self) -> None:
        # gunicorn's handler builds the access-log record even when access logging is
        # off (production's default): skip that work on every request. It also fails
        # (AttributeError, a traceback per request) for a request that got no WSGI
        # environ; those were logged as errors when they were refused.
        if getattr(self, "environ", None) is None:
            return
        if getattr(self.server.log, "access_log_enabled", True):
            super().log_request()

    def _write_with_headers(self, data: bytes) -> None:
        self._collect = bytearray()
        try:
            super()._write_with_headers(data)  # the head, then the first body bytes
            head_and_body = self._collect
        finally:
            self._collect = None
        self._send(head_and_body)


class ApiWorker(GeventPyWSGIWorker):
    def init_process(self) -> None:
        # This server's deadlines and body limit (SAGELLM_*) and --keep-alive, on a
        # handler class of this worker process's own.
        settings = Settings.from_env()
        limits = Limits(
            head_timeout_s=settings.request_head_timeout_s,
            body_timeout_s=settings.request_body_timeout_s,
            max_body_bytes=settings.max_body_bytes,
            idle_timeout_s=float(self.cfg.keepalive),
        )
        self.wsgi_handler = type("ApiHandler", (ApiHandler,), {"limits": limits})
        super().init_process()
