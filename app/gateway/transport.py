"""Moving bytes to and from engines: a minimal HTTP/1.1 client over pooled keep-alive
sockets.

The gateway's throughput on a small head node is bounded by CPU per request, and per
SSE chunk for streams (``bench/gateway.py``). ``http.client`` already cost a quarter
of httpx's CPU (``bench/transport_clients.py``), but still parses every response head
with the ``email`` package and walks several buffered-IO layers per chunk. This
client sends the request in one write, parses the head with ``bytes.split`` and
decodes chunked bodies straight from one receive buffer.

Streams: ``Upstream.pieces`` yields whatever body bytes have arrived, as soon as they
arrive, so the first token is never held back. When several upstream chunks are
already waiting (the gateway was busy), they go out as one piece: the client sees the
same bytes, with fewer writes. The request is sent and the status read before the
response to the client starts, so a connect error or a 5xx can still fail over; the
connection is closed when a relay ends early, including when the client goes away.

Nothing is sent twice once the engine may have acted on it: a stale pooled connection
is retried, and the proxy fails over, only on a ``NoAnswer`` (no byte of the answer came
back); a read timeout or a connection that dies mid-head is a plain ``UpstreamError``.

Not supported, because engines do not send them: pipelining, ``Expect: 100-continue``
(interim 1xx replies are skipped), upgrades, compressed transfer codings.

Engines are ``http://``; an external engine (``app.core.external``) may be ``https://``
(verified against the system's CA store; ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are
honoured) and may have a path prefix, which goes before the ``/v1/...`` path.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections import deque
from collections.abc import Iterator
from urllib.parse import urlsplit

import httptools

# Connecting must be quick (or we fail over); engines may take long for a first token.
CONNECT_TIMEOUT_S = 3.0
RECV_BYTES = 65536
MAX_HEAD_BYTES = 65536  # status line and headers of one response
# What a pooled connection is to: host, port, and whether it speaks TLS.
_Key = tuple[str, int, bool]


class UpstreamError(Exception):
    """The engine could not be reached, broke the protocol, or dropped the connection.

    Unless it is a ``NoAnswer``, the engine may have received the request and acted on
    it: it must not be sent again, to this engine or another (POSTs are not idempotent).
    """


class NoAnswer(UpstreamError):
    """Not one byte of an answer came back: the engine could not be reached, the request
    could not be sent, or the connection was closed or reset before the answer began.
    Only then may the request be sent again (a fresh connection, another engine)."""


class _Closed(NoAnswer):
    """The engine closed (or reset) the connection. Escapes ``Transport.open`` only when
    no byte of the answer had arrived; later it becomes a plain ``UpstreamError``."""


class _Conn:
    """One socket to an engine, its llhttp response parser, and the response being read.

    The parser persists across the responses of a keep-alive connection; its callbacks
    (``on_*``) fill in the current response as ``fill`` feeds it received bytes."""

    __slots__ = (
        "body",
        "complete",
        "extra",
        "head_bytes",
        "head_done",
        "headers",
        "keep_alive",
        "key",
        "parser",
        "received",
        "sock",
        "status",
    )

    def __init__(self, sock: socket.socket, key: _Key) -> None:
        self.sock = sock
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self.extra = False  # bytes past the end of a response: never reused
        self.reset()

    def reset(self) -> None:
        """Expect the next response."""
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.head_done = False
        self.keep_alive = False
        self.head_bytes = 0
        self.body: list[bytes] = []
        self.complete = False
        self.received = 0  # bytes of this answer received (interim 1xx included)

    # llhttp callbacks
    def on_message_begin(self) -> None:
        if self.complete and not 100 <= self.status < 200:
            self.extra = True  # past the end of a final response
        elif self.complete:  # the answer after an interim 1xx
            received = self.received
            self.reset()
            self.received = received

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # not a chunked trailer
            self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if not self.extra:
            self.head_done = True
            self.status = self.parser.get_status_code()
            # Now: once the message is complete, llhttp has reset what this reads.
            self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        if not self.extra:
            self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True

    def fill(self) -> None:
        """Wait for more bytes (at least one) and parse them."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except ConnectionError as exc:  # reset: for a stale keep-alive socket, retried
            raise _Closed(f"{self.key[0]}:{self.key[1]} reset the connection") from exc
        except OSError as exc:
            raise UpstreamError(f"receiving from {self.key[0]}:{self.key[1]}: {exc!r}") from exc
        if not data:
            raise _Closed(f"{self.key[0]}:{self.key[1]} closed the connection")
        self.received += len(data)
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise UpstreamError("the engine switched protocols") from None
        except httptools.HttpParserError as exc:
            # Anything malformed (framing, a length like "²"): the engine's fault, a 502.
            raise UpstreamError(
                f"malformed response from {self.key[0]}:{self.key[1]}: {exc}"
            ) from None
        if not self.head_done and self.head_bytes > MAX_HEAD_BYTES:
            raise UpstreamError(f"response head over {MAX_HEAD_BYTES} bytes")

    def close(self) -> None:
        self.sock.close()


class Upstream:
    """An engine's response: status and headers read, body still on the wire."""

    def __init__(self, conn: _Conn, until_close: bool) -> None:
        self.conn = conn
        self.status_code = conn.status
        self._headers = conn.headers
        self._until_close = until_close  # no length, not chunked: the body ends at close
        self.keep_alive = conn.keep_alive and not until_close

    @property
    def complete(self) -> bool:
        return self.conn.complete

    def headers(self) -> list[tuple[str, str]]:
        return self._headers

    def header(self, name: str) -> str:
        name = name.lower()
        for k, v in self._headers:
            if k.lower() == name:
                return v
        return ""

    def pieces(self) -> Iterator[bytes]:
        """The body as it arrives: each piece is everything received so far that has
        not been yielded yet (at least one byte); ends when the body is complete."""
        conn = self.conn
        body = conn.body
        while True:
            if body:
                piece = body[0] if len(body) == 1 else b"".join(body)
                body.clear()
                yield piece
            if conn.complete:
                return
            try:
                conn.fill()
            except _Closed:
                if not self._until_close:
                    raise UpstreamError("the engine closed the connection mid-body") from None
                conn.complete = True


def _until_close(status: int, headers: list[tuple[str, str]]) -> bool:
    """Whether the body is delimited by the connection closing (RFC 9112 section 6.3):
    no Content-Length and no Transfer-Encoding on a response that has a body."""
    if status in (204, 304) or 100 <= status < 200:
        return False
    return not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers)


class Transport:
    """Thread- and greenlet-safe pool of idle keep-alive connections per engine."""

    def __init__(
        self,
        read_timeout_s: float = 600.0,
        max_idle_per_host: int = 128,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.read_timeout_s = read_timeout_s
        self.max_idle = max_idle_per_host
        self._idle: dict[_Key, deque[_Conn]] = {}
        self._lock = threading.Lock()
        self._targets: dict[str, tuple[_Key, str]] = {}
        self._tls = tls  # built on the first https:// engine (default: the system's CAs)

    def _target(self, base_url: str) -> tuple[_Key, str]:
        """Where ``base_url`` is (host, port, TLS) and its path prefix."""
        target = self._targets.get(base_url)
        if target is None:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https"):
                raise NoAnswer(f"{base_url}: only http:// and https:// engines are supported")
            tls = parts.scheme == "https"
            key = (parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80), tls)
            target = self._targets[base_url] = (key, parts.path.rstrip("/"))
        return target

    def _checkout(self, key: _Key) -> _Conn | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def _checkin(self, up: Upstream) -> None:
        conn = up.conn
        if up.keep_alive and up.complete and not conn.extra:
            with self._lock:
                idle = self._idle.setdefault(conn.key, deque())
                if len(idle) < self.max_idle:
                    idle.append(conn)
                    return
        conn.close()

    def _connect(self, key: _Key) -> _Conn:
        try:
            sock = socket.create_connection(key[:2], timeout=CONNECT_TIMEOUT_S)
            if key[2]:
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                sock = self._tls.wrap_socket(sock, server_hostname=key[0])  # handshake
        except OSError as exc:  # ssl.SSLError (a refused certificate) included
            raise NoAnswer(f"connect to {key[0]}:{key[1]}: {exc}") from exc
        sock.settimeout(self.read_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock, key)

    def open(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> Upstream:
        """Send a POST and read the status line and headers (not the body)."""
        key, prefix = self._target(base_url)
        head = [f"POST {prefix}{path} HTTP/1.1", f"Host: {key[0]}:{key[1]}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        request = "\r\n".join(head).encode("latin-1") + body
        conn = self._checkout(key)
        for attempt in range(2):
            reused = conn is not None
            if conn is None:
                conn = self._connect(key)
            try:
                conn.sock.sendall(request)
                return self._response(conn)
            except (UpstreamError, OSError) as exc:
                conn.close()
                conn = None
                # An idle keep-alive connection the engine had closed: retry once, fresh.
                # Only when not one byte of the answer came back (``_response`` turns a
                # close after the first byte into a plain UpstreamError): had the engine
                # started answering, it would act on the request twice.
                if reused and attempt == 0 and isinstance(exc, (_Closed, ConnectionError)):
                    continue
                if isinstance(exc, UpstreamError):
                    raise
                # sendall failed: the engine did not get the whole request.
                raise NoAnswer(f"{key[0]}:{key[1]}{path}: {exc!r}") from exc
        raise UpstreamError(f"{key[0]}:{key[1]}{path}: no connection")  # pragma: no cover

    def _response(self, conn: _Conn) -> Upstream:
        conn.reset()
        # Interim 1xx responses are skipped (``on_message_begin`` starts over after one).
        while not conn.head_done or 100 <= conn.status < 200:
            try:
                conn.fill()
            except _Closed as exc:
                if conn.received:  # not a NoAnswer: never sent again
                    raise UpstreamError(f"{exc} after the answer had begun; not retried") from None
                raise
        for name, value in conn.headers:
            # llhttp reads a response with another coding until close; we decode none.
            if name.lower() == "transfer-encoding" and value.strip().lower() != "chunked":
                raise UpstreamError(f"unsupported Transfer-Encoding {value!r}")
        return Upstream(conn, _until_close(conn.status, conn.headers))

    def read(self, up: Upstream) -> bytes:
        """The whole body; the connection goes back to the pool."""
        try:
            data = b"".join(up.pieces())
        except UpstreamError:
            up.conn.close()
            raise
        self._checkin(up)
        return data

    def chunks(self, up: Upstream) -> Iterator[bytes]:
        """The body as it arrives. Closes the connection unless the body was read to the
        end (then it is reused)."""
        try:
            yield from up.pieces()
        finally:
            if up.complete:
                self._checkin(up)
            else:
                up.conn.close()

    def close(self) -> None:
        with self._lock:
            for idle in self._idle.values():
                for conn in idle:
                    conn.close()
            self._idle.clear()
