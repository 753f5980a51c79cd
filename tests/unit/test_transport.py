"""The gateway's HTTP/1.1 client against scripted servers on real loopback sockets:
framing, keep-alive reuse, stale-connection retry, streaming without waiting, and
errors that must not leave a broken connection in the pool."""

from __future__ import annotations

import io
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from app.core.spec import EngineKind
from app.gateway.discovery import Backend
from app.gateway.proxy import GatewayProxy
from app.gateway.routes import Gateway
from app.gateway.transport import MAX_HEAD_BYTES, NoAnswer, Transport, UpstreamError
from app.state.gateway_report import GatewayTraffic

Handler = Callable[[socket.socket], None]


class Scripted:
    """A loopback server; every accepted connection is run by ``handler`` in a thread."""

    def __init__(self, handler: Handler) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            self.handler(conn)

    def read_request(self, conn: socket.socket) -> bytes | None:
        """One request (head and Content-Length body), or None at EOF."""
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                return None
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append(data)
        return data

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def transport() -> Iterator[Transport]:
    t = Transport(read_timeout_s=5)
    yield t
    t.close()


def _serve(server: Scripted, replies: list[bytes], conn: socket.socket) -> None:
    for reply in replies:
        if server.read_request(conn) is None:
            return
        conn.sendall(reply)
    conn.recv(1)  # hold the connection open until the client closes it


def scripted(*replies: bytes) -> Scripted:
    """Answers the requests on each connection with ``replies``, in order."""

    def serve(conn: socket.socket) -> None:
        _serve(server, list(replies), conn)

    server = Scripted(serve)
    return server


def _json(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def _chunked(*payloads: bytes, trailer: bytes = b"") -> bytes:
    out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    out += b"Transfer-Encoding: chunked\r\n\r\n"
    for p in payloads:
        out += b"%x;ext=1\r\n%s\r\n" % (len(p), p)
    return out + b"0\r\n" + trailer + b"\r\n"


def test_sends_one_post_and_reuses_the_keep_alive_connection(transport: Transport) -> None:
    server = scripted(_json(b'{"a":1}'), _json(b'{"b":2}', b"X-Engine: e1\r\n"))
    up = transport.open(server.url, "/v1/chat/completions", b'{"q":1}', {"Accept": "x/y"})
    assert up.status_code == 200 and transport.read(up) == b'{"a":1}'
    up = transport.open(server.url, "/v1/embeddings", b"{}", {})
    assert up.header("x-engine") == "e1" and ("X-Engine", "e1") in up.headers()
    assert transport.read(up) == b'{"b":2}'
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in first
    assert b"Accept: x/y\r\n" in first and b"Content-Length: 7\r\n" in first
    assert first.endswith(b'\r\n\r\n{"q":1}')


def test_chunked_bodies_decode_whatever_way_the_bytes_are_split(transport: Transport) -> None:
    payloads = [b"data: one\n\n", b"data: " + b"x" * 3000 + b"\n\n", b"data: [DONE]\n\n"]
    wire = _chunked(*payloads, trailer=b"X-Trailer: t\r\n")

    def trickle(conn: socket.socket) -> None:
        for _ in range(2):
            if server.read_request(conn) is None:
                return
            for i in range(0, len(wire), 7):  # 7-byte writes split every line and CRLF
                conn.sendall(wire[i : i + 7])
        conn.recv(1)

    server = Scripted(trickle)
    for _ in range(2):
        up = transport.open(server.url, "/v1/completions", b"{}", {})
        assert transport.read(up) == b"".join(payloads)
    assert server.connections == 1  # complete bodies leave the connection reusable


def test_a_stream_yields_what_has_arrived_without_waiting_and_joins_what_waited(
    transport: Transport,
) -> None:
    go = threading.Event()
    wire = _chunked(b"A", b"B", b"C")
    head_and_a, rest = wire.split(b"1;ext=1\r\nB", 1)

    def paced(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(head_and_a)
        go.wait(10)  # B and C are only sent once the client has seen A
        conn.sendall(b"1;ext=1\r\nB" + rest)
        conn.recv(1)

    server = Scripted(paced)
    up = transport.open(server.url, "/v1/chat/completions", b"{}", {})
    pieces = transport.chunks(up)
    assert next(pieces) == b"A"  # would hang (timeout) if the relay waited for more
    go.set()
    assert list(pieces) == [b"BC"]  # both were waiting: one piece, one write to the client
    assert up.complete


def test_a_body_delimited_by_close_is_read_and_the_connection_is_not_kept(
    transport: Transport,
) -> None:
    def once(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")

    server = Scripted(once)
    for _ in range(2):
        assert transport.read(transport.open(server.url, "/x", b"", {})) == b"all of it"
    assert server.connections == 2


def test_connection_close_is_honoured(transport: Transport) -> None:
    server = scripted(_json(b"1", b"Connection: close\r\n"))
    for _ in range(2):
        assert transport.read(transport.open(server.url, "/x", b"", {})) == b"1"
    assert server.connections == 2


def test_an_idle_connection_the_engine_closed_is_retried_once_on_a_fresh_one(
    transport: Transport,
) -> None:
    def one_per_connection(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(_json(b"ok"))  # keep-alive promised, then closed (an idle timeout)

    server = Scripted(one_per_connection)
    for _ in range(3):
        assert transport.read(transport.open(server.url, "/x", b"{}", {})) == b"ok"
    assert server.connections == 3
    assert len(server.requests) == 3  # each request reached the engine exactly once


def test_interim_1xx_replies_are_skipped(transport: Transport) -> None:
    server = scripted(b"HTTP/1.1 100 Continue\r\n\r\n" + _json(b"done"))
    up = transport.open(server.url, "/x", b"", {})
    assert up.status_code == 200 and transport.read(up) == b"done"


def test_an_abandoned_stream_closes_its_connection(transport: Transport) -> None:
    closed = threading.Event()

    def endless(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(_chunked(b"first")[: -len(b"0\r\n\r\n")])
        if conn.recv(1) == b"":  # EOF: the gateway hung up
            closed.set()

    server = Scripted(endless)
    pieces = transport.chunks(transport.open(server.url, "/x", b"", {}))
    assert next(pieces) == b"first"
    pieces.close()  # the client went away
    assert closed.wait(5)
    assert not any(transport._idle.values())


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n", "after chunk data"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab", "Duplicate"),
        # issue 11: a non-ASCII digit was a ValueError that left the in-flight count stuck
        ("HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\n".encode(), "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab", "Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding",
        ),
        (b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n", "malformed"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\n",
            "overflow",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "mid-body"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed response"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed response"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * MAX_HEAD_BYTES, "response head over"),
    ],
)
def test_protocol_errors_are_upstream_errors_and_never_pooled(
    transport: Transport, reply: bytes, message: str
) -> None:
    def bad(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(reply)  # then the handler returns: the connection closes

    server = Scripted(bad)
    with pytest.raises(UpstreamError, match=message):
        transport.read(transport.open(server.url, "/x", b"", {}))
    assert not any(transport._idle.values())


def test_unreachable_engines_and_other_schemes_are_upstream_errors(transport: Transport) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
    with pytest.raises(UpstreamError, match=r"connect to 127\.0\.0\.1"):
        transport.open(f"http://127.0.0.1:{port}", "/x", b"", {})
    with pytest.raises(NoAnswer, match=r"connect to 127\.0\.0\.1:1"):  # TLS: external engines
        transport.open("https://127.0.0.1:1", "/x", b"", {})
    with pytest.raises(UpstreamError, match="only http:// and https://"):
        transport.open("ftp://127.0.0.1:1", "/x", b"", {})


# Issue 10, case 7: a request must never reach an engine twice. A reused keep-alive
# connection is retried on a fresh one only when not one byte of the answer came back.
@pytest.mark.parametrize(
    ("answer_start", "reset"),
    [
        (b"HTTP/1.1 2", False),  # a partial status line, then closed
        (b"HTTP/1.1 2", True),  # ... then reset
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", False),  # a partial head
        (b"HTTP/1.1 100 Continue\r\n\r\n", False),  # an interim reply, then closed
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", False),  # head, part body
    ],
)
def test_a_reused_connection_is_not_retried_once_the_engine_started_answering(
    transport: Transport, answer_start: bytes, reset: bool
) -> None:
    def then_dies(conn: socket.socket) -> None:
        server.read_request(conn)
        conn.sendall(_json(b"ok"))
        server.read_request(conn)  # the second request, on the kept-alive connection
        conn.sendall(answer_start)
        if reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    server = Scripted(then_dies)
    assert transport.read(transport.open(server.url, "/x", b"{}", {})) == b"ok"
    with pytest.raises(UpstreamError) as caught:
        transport.read(transport.open(server.url, "/x", b"{}", {}))
    assert not isinstance(caught.value, NoAnswer)  # nor may the gateway fail over
    assert len(server.requests) == 2  # the second request reached the engine once
    assert server.connections == 1  # and no fresh connection was opened to resend it
    assert not any(transport._idle.values())


def test_errors_say_whether_the_engine_can_have_seen_the_request(transport: Transport) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
    with pytest.raises(NoAnswer):
        transport.open(f"http://127.0.0.1:{port}", "/x", b"", {})

    def closes_unanswered(conn: socket.socket) -> None:
        server.read_request(conn)  # then closed without a byte of an answer

    server = Scripted(closes_unanswered)
    with pytest.raises(NoAnswer, match="closed the connection"):
        transport.open(server.url, "/x", b"", {})

    def slow(conn: socket.socket) -> None:
        slow_server.read_request(conn)
        conn.recv(1)  # sent, maybe being processed, no answer yet

    slow_server = Scripted(slow)
    impatient = Transport(read_timeout_s=0.2)
    with pytest.raises(UpstreamError) as caught:
        impatient.open(slow_server.url, "/x", b"", {})
    impatient.close()
    assert not isinstance(caught.value, NoAnswer)  # a read timeout: it may be working


class _Directory:
    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends
        self.ejected: list[str] = []

    def resolve(self, model: str | None, kind: EngineKind) -> list[Backend]:
        return self.backends

    def eject(self, engine_id: str) -> None:
        self.ejected.append(engine_id)


class _InOrder:
    def order(self, candidates: list[Backend], in_flight: dict[str, int]) -> list[Backend]:
        return list(candidates)


def _backend(engine_id: str, url: str) -> Backend:
    return Backend(engine_id, EngineKind.LLM, url, "m", frozenset({"m"}), 0.0)


def _post_through_proxy(transport: Transport, *urls: str) -> tuple[str, bytes]:
    backends = [_backend(f"e{i}", url) for i, url in enumerate(urls)]
    gw = Gateway(_Directory(backends), _InOrder(), transport, GatewayTraffic())  # type: ignore[arg-type]
    proxy = GatewayProxy(lambda environ, start: [], gw, (), "")
    body = b'{"model": "m", "messages": []}'
    environ = {
        "PATH_INFO": "/v1/chat/completions",
        "REQUEST_METHOD": "POST",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    status: list[str] = []
    out = b"".join(proxy(environ, lambda s, headers: status.append(s)))
    return status[0], out


@pytest.mark.parametrize(
    "first_engine_does",
    [
        lambda conn: conn.sendall(b"HTTP/1.1 2"),  # started answering, then died
        lambda conn: conn.recv(1),  # still working when the read timeout hit
    ],
    ids=["partial-answer", "read-timeout"],
)
def test_the_proxy_fails_over_only_when_the_first_engine_sent_nothing(
    first_engine_does: Handler,
) -> None:
    def first_engine(conn: socket.socket) -> None:
        first.read_request(conn)
        first_engine_does(conn)

    first = Scripted(first_engine)
    second = scripted(_json(b'{"id": "x"}'))
    transport = Transport(read_timeout_s=0.5)
    try:
        status, body = _post_through_proxy(transport, first.url, second.url)
    finally:
        transport.close()
    assert status.startswith("502") and b"upstream_error" in body
    assert len(first.requests) == 1 and not second.requests  # executed at most once

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    transport = Transport(read_timeout_s=5)
    try:
        assert _post_through_proxy(transport, refused, second.url) == ("200 OK", b'{"id": "x"}')
    finally:
        transport.close()
    assert len(second.requests) == 1  # nothing reached the first: failing over is safe


def test_every_balancer_name_the_settings_accept_makes_that_policy() -> None:
    from app.core.balancing import BALANCER_NAMES
    from app.core.errors import UnknownPolicyError
    from app.gateway.balancing import make_balancer

    for name in BALANCER_NAMES:
        assert make_balancer(name).name == name
    with pytest.raises(UnknownPolicyError, match="least_outstanding, round_robin"):
        make_balancer("fastest")
