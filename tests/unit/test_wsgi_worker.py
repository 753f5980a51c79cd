"""The API worker's request reader (llhttp through httptools) on a socket pair:
heads, bodies, pipelining, limits and deadlines, without a server around it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from app.gateway.server import MAX_HEADER_FIELDS, Limits, Rejected, RequestReader

LIMITS = Limits(head_timeout_s=0.5, body_timeout_s=0.5, max_body_bytes=1000, idle_timeout_s=0.5)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _read(raw: bytes, pair: tuple[socket.socket, socket.socket]) -> tuple[object, bytes]:
    server, client = pair
    client.sendall(raw)
    reader = RequestReader(server, LIMITS)
    got = reader.next_head()
    assert got is not None
    head, req = got
    return head, reader.read_body(head, req)


def test_head_body_and_pipelined_requests(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(
        b"POST /a?q=1 HTTP/1.1\r\nHost: x\r\nX-Tag: a\r\nX-Tag:\tb\r\nContent-Length: 2\r\n\r\n{}"
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2;ext=1\r\n[]\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    reader = RequestReader(server, LIMITS)
    got = reader.next_head()
    assert got is not None
    head, req = got
    assert (head.method, head.target, head.version) == ("POST", "/a?q=1", "HTTP/1.1")
    assert ("X-Tag", "a") in head.headers and ("X-Tag", "b") in head.headers
    assert head.keep_alive and reader.read_body(head, req) == b"{}"
    got = reader.next_head()
    assert got is not None
    head, req = got
    assert head.chunked and reader.read_body(head, req) == b"[]"
    assert all(name != "X-Trailer" for name, _ in head.headers)
    client.close()
    assert reader.next_head() is None


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400, "gzip"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "Transfer-Encoding can't be present with Content-Length",
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: 2_8\r\n\r\n", 400, "Content-Length"),
        (b"GET / HTTP/1.1\r\nX-A: 1\rX-B: 2\r\n\r\n", 400, "LF after header value"),
        (b"GET / HTTP/2.0\r\n\r\n", 400, "HTTP/2.0"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "target"),
        (b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * (MAX_HEADER_FIELDS + 1) + b"\r\n", 400, "fields"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", 413, "1000 bytes"),
    ],
)
def test_malformed_or_oversized_heads_are_rejected(
    pair: tuple[socket.socket, socket.socket], raw: bytes, status: int, reason: str
) -> None:
    with pytest.raises(Rejected, match=reason) as caught:
        _read(raw, pair)
    assert caught.value.status == status
    assert caught.value.response().startswith(b"HTTP/1.1 %d " % status)


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.sendall(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    reader = RequestReader(server, LIMITS)
    got = reader.next_head()
    assert got is not None
    client.sendall(b"%x\r\n%s\r\n" % (1001, b"a" * 1001))  # no terminating chunk
    with pytest.raises(Rejected, match="over the limit") as caught:
        reader.read_body(*got)
    assert caught.value.status == 413


def test_deadlines_cover_the_whole_head_and_body_however_slow_the_trickle(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    stop = threading.Event()

    def trickle() -> None:  # one byte every 0.1 s: each read is quick, the total is not
        for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            if stop.wait(0.1):
                return
            client.send(bytes([byte]))

    threading.Thread(target=trickle, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(Rejected, match="head not received") as caught:
        RequestReader(server, LIMITS).next_head()
    stop.set()
    assert caught.value.status == 408 and time.monotonic() - t0 < 0.5 + 0.3


def test_an_idle_connection_ends_without_an_answer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    assert RequestReader(pair[0], LIMITS).next_head() is None


def test_a_stalled_body_is_408(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")
    reader = RequestReader(server, LIMITS)
    got = reader.next_head()
    assert got is not None
    with pytest.raises(Rejected, match="body not received") as caught:
        reader.read_body(*got)
    assert caught.value.status == 408
