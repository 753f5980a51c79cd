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
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Iterator
from urllib.parse import urlsplit

# Connecting must be quick (or we fail over); engines may take long for a first token.
CONNECT_TIMEOUT_S = 3.0
RECV_BYTES = 65536
MAX_HEAD_BYTES = 65536  # status line and headers of one response
MAX_LINE_BYTES = 4096  # one chunk-size or trailer line

# Body framing (RFC 9112 section 6.3).
_LENGTH, _CHUNKED, _UNTIL_CLOSE = 0, 1, 2
# Chunked decoder states.
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


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
    """One socket to an engine and the bytes received on it but not yet consumed."""

    __slots__ = ("buf", "key", "sock")

    def __init__(self, sock: socket.socket, key: tuple[str, int]) -> None:
        self.sock = sock
        self.key = key
        self.buf = bytearray()

    def fill(self) -> None:
        """Wait for more bytes (at least one) and append them to the buffer."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except ConnectionError as exc:  # reset: for a stale keep-alive socket, retried
            raise _Closed(f"{self.key[0]}:{self.key[1]} reset the connection") from exc
        except OSError as exc:
            raise UpstreamError(f"receiving from {self.key[0]}:{self.key[1]}: {exc!r}") from exc
        if not data:
            raise _Closed(f"{self.key[0]}:{self.key[1]} closed the connection")
        self.buf += data

    def close(self) -> None:
        self.sock.close()


class Upstream:
    """An engine's response: status and headers read, body still on the wire."""

    def __init__(
        self,
        conn: _Conn,
        status: int,
        headers: list[tuple[str, str]],
        framing: int,
        length: int,
        keep_alive: bool,
    ) -> None:
        self.conn = conn
        self.status_code = status
        self._headers = headers
        self._framing = framing
        self._left = length  # _LENGTH: body bytes still to come; _CHUNKED: of this chunk
        self._state = _DONE if framing == _LENGTH and length == 0 else _SIZE
        self.keep_alive = keep_alive

    @property
    def complete(self) -> bool:
        return self._state == _DONE

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
        while self._state != _DONE:
            if self._framing == _CHUNKED:
                piece = self._decode_chunked()
            elif self._framing == _LENGTH:
                piece = self._take(self._left)
                self._left -= len(piece)
                if not self._left:
                    self._state = _DONE
            else:
                piece = self._take(len(conn.buf))
            if piece:
                yield piece
                continue
            if self._state == _DONE:
                return
            try:
                conn.fill()
            except _Closed:
                if self._framing != _UNTIL_CLOSE:
                    raise UpstreamError("the engine closed the connection mid-body") from None
                self._state = _DONE

    def _take(self, n: int) -> bytes:
        buf = self.conn.buf
        if not buf or n <= 0:
            return b""
        if n >= len(buf):
            piece = bytes(buf)
            buf.clear()
        else:
            piece = bytes(buf[:n])
            del buf[:n]
        return piece

    def _decode_chunked(self) -> bytes:
        """Decode as much of the buffer as is complete; returns the payload bytes."""
        buf = self.conn.buf
        out = bytearray()
        pos, end = 0, len(buf)
        state = self._state
        while state != _DONE:
            if state == _DATA:
                take = min(self._left, end - pos)
                if not take:
                    break
                out += buf[pos : pos + take]
                pos += take
                self._left -= take
                if not self._left:
                    state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise UpstreamError("malformed chunked body: no CRLF after chunk data")
                pos += 2
                state = _SIZE
            else:  # _SIZE or _TRAILER: one line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > MAX_LINE_BYTES:
                        raise UpstreamError("malformed chunked body: line too long")
                    break
                line = buf[pos:eol]
                pos = eol + 2
                if state == _TRAILER:
                    if not line:
                        state = _DONE
                    continue
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    size = -1
                if size < 0:
                    raise UpstreamError(f"malformed chunked body: chunk size {bytes(line)!r}")
                if size:
                    self._left, state = size, _DATA
                else:
                    state = _TRAILER
        self._state = state
        del buf[:pos]
        return bytes(out)


def _parse_head(head: bytes) -> tuple[int, list[tuple[str, str]], bool]:
    """Status, headers and whether the response was HTTP/1.1."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError(f"malformed status line {bytes(lines[0][:100])!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise UpstreamError(f"malformed header line {bytes(line[:100])!r}")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return int(parts[1]), headers, parts[0] == b"HTTP/1.1"


def _framing(status: int, headers: list[tuple[str, str]], http11: bool) -> tuple[int, int, bool]:
    """(framing, content length, keep-alive) per RFC 9112 section 6.3."""
    length: int | None = None
    chunked = False
    connection = ""
    for name, value in headers:
        lname = name.lower()
        if lname == "transfer-encoding":
            chunked = value.lower().rsplit(",", 1)[-1].strip() == "chunked"
            if not chunked:
                raise UpstreamError(f"unsupported transfer-encoding {value!r}")
        elif lname == "content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise UpstreamError(f"malformed content-length {value!r}")
            length = int(value)
        elif lname == "connection":
            connection = value.lower()
    keep_alive = "keep-alive" in connection if not http11 else "close" not in connection
    if status in (204, 304):
        return _LENGTH, 0, keep_alive
    if chunked:
        return _CHUNKED, 0, keep_alive
    if length is not None:
        return _LENGTH, length, keep_alive
    return _UNTIL_CLOSE, 0, False


class Transport:
    """Thread- and greenlet-safe pool of idle keep-alive connections per engine."""

    def __init__(self, read_timeout_s: float = 600.0, max_idle_per_host: int = 128) -> None:
        self.read_timeout_s = read_timeout_s
        self.max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int], deque[_Conn]] = {}
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[str, int]] = {}

    def _key(self, base_url: str) -> tuple[str, int]:
        key = self._keys.get(base_url)
        if key is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http":
                raise NoAnswer(f"{base_url}: only http:// engines are supported")
            key = (parts.hostname or "127.0.0.1", parts.port or 80)
            self._keys[base_url] = key
        return key

    def _checkout(self, key: tuple[str, int]) -> _Conn | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def _checkin(self, up: Upstream) -> None:
        conn = up.conn
        if up.keep_alive and up.complete and not conn.buf:
            with self._lock:
                idle = self._idle.setdefault(conn.key, deque())
                if len(idle) < self.max_idle:
                    idle.append(conn)
                    return
        conn.close()

    def _connect(self, key: tuple[str, int]) -> _Conn:
        try:
            sock = socket.create_connection(key, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise NoAnswer(f"connect to {key[0]}:{key[1]}: {exc}") from exc
        sock.settimeout(self.read_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock, key)

    def open(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> Upstream:
        """Send a POST and read the status line and headers (not the body)."""
        key = self._key(base_url)
        head = [f"POST {path} HTTP/1.1", f"Host: {key[0]}:{key[1]}"]
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
        interim = False  # a 1xx was read: the answer has begun, though buf is empty
        while True:  # interim 1xx responses are skipped
            while (end := conn.buf.find(b"\r\n\r\n")) < 0:
                if len(conn.buf) > MAX_HEAD_BYTES:
                    raise UpstreamError(f"response head over {MAX_HEAD_BYTES} bytes")
                try:
                    conn.fill()
                except _Closed as exc:
                    if conn.buf or interim:  # not a NoAnswer: never sent again
                        raise UpstreamError(
                            f"{exc} after the answer had begun "
                            f"({bytes(conn.buf[:40])!r}); not retried"
                        ) from None
                    raise
            status, headers, http11 = _parse_head(bytes(conn.buf[:end]))
            del conn.buf[: end + 4]
            if not 100 <= status < 200:
                break
            if status == 101:
                raise UpstreamError("the engine switched protocols")
            interim = True
        framing, length, keep_alive = _framing(status, headers, http11)
        return Upstream(conn, status, headers, framing, length, keep_alive)

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
