"""Moving bytes to and from engines: a keep-alive connection pool over ``http.client``.

Measured in ``bench/transport_clients.py``: for small proxied POSTs ``http.client``
costs about a quarter of httpx's CPU per request (httpx's pool also serialises 32
threads on one lock), and CPU is what limits a Python gateway on a small head node.

Streams are relayed chunk by chunk (``read1``: whatever has arrived, one socket read at
most). The upstream request is sent, and its status read, before the response to the
client starts, so a connect error or a 5xx can still fail over; it is closed when the
relay ends, including when the client goes away.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

# Connecting must be quick (or we fail over); engines may take long for a first token.
CONNECT_TIMEOUT_S = 3.0
CHUNK = 65536


class UpstreamError(Exception):
    """The engine could not be reached or dropped the connection before answering."""


@dataclass
class Upstream:
    response: http.client.HTTPResponse
    conn: http.client.HTTPConnection
    key: tuple[str, int]

    @property
    def status_code(self) -> int:
        return self.response.status

    def headers(self) -> list[tuple[str, str]]:
        return self.response.getheaders()

    def header(self, name: str) -> str:
        return self.response.getheader(name) or ""


class Transport:
    """Thread-safe pool of idle keep-alive connections per engine (host, port)."""

    def __init__(self, read_timeout_s: float = 600.0, max_idle_per_host: int = 128) -> None:
        self.read_timeout_s = read_timeout_s
        self.max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int], deque[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[str, int]] = {}

    def _key(self, base_url: str) -> tuple[str, int]:
        key = self._keys.get(base_url)
        if key is None:
            parts = urlsplit(base_url)
            key = (parts.hostname or "127.0.0.1", parts.port or 80)
            self._keys[base_url] = key
        return key

    def _checkout(self, key: tuple[str, int]) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def _checkin(self, up: Upstream) -> None:
        if up.response.will_close:
            up.conn.close()
            return
        with self._lock:
            idle = self._idle.setdefault(up.key, deque())
            if len(idle) < self.max_idle:
                idle.append(up.conn)
                return
        up.conn.close()

    def _connect(self, key: tuple[str, int]) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(key[0], key[1], timeout=CONNECT_TIMEOUT_S)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise UpstreamError(f"connect to {key[0]}:{key[1]}: {exc}") from exc
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout_s)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def open(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> Upstream:
        """Send the request and read the status line and headers (not the body)."""
        key = self._key(base_url)
        conn = self._checkout(key)
        for attempt in range(2):
            reused = conn is not None
            if conn is None:
                conn = self._connect(key)
            try:
                conn.request("POST", path, body, headers)
                return Upstream(conn.getresponse(), conn, key)
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                conn = None
                # An idle keep-alive connection the engine closed: retry once, fresh.
                if reused and attempt == 0:
                    continue
                raise UpstreamError(f"{key[0]}:{key[1]}{path}: {exc!r}") from exc
        raise UpstreamError(f"{key[0]}:{key[1]}{path}: no connection")  # pragma: no cover

    def read(self, up: Upstream) -> bytes:
        """The whole body; the connection goes back to the pool."""
        try:
            data = up.response.read()
        except (http.client.HTTPException, OSError) as exc:
            up.conn.close()
            raise UpstreamError(f"reading the answer: {exc!r}") from exc
        self._checkin(up)
        return data

    def chunks(self, up: Upstream) -> Iterator[bytes]:
        """The body as it arrives. Closes the connection unless the body was read to the
        end (then it is reused)."""
        complete = False
        try:
            while True:
                chunk = up.response.read1(CHUNK)
                if not chunk:
                    complete = True
                    return
                yield chunk
        except (http.client.HTTPException, OSError) as exc:
            raise UpstreamError(f"stream broke: {exc!r}") from exc
        finally:
            if complete:
                self._checkin(up)
            else:
                up.conn.close()

    def close(self) -> None:
        with self._lock:
            for idle in self._idle.values():
                for conn in idle:
                    conn.close()
            self._idle.clear()
