"""The API as production serves it: gunicorn with ``app.dev.stack.gunicorn_argv`` (the
``app.gateway.server.ApiWorker`` class), proxying to a paced OpenAI-style backend."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.dev.redis_server import free_port
from app.dev.stack import gunicorn_argv
from bench.fake_openai_backend import FakeBackend, serve_in_thread
from tests.integration.harness import ClusterEnv, wait_until

pytestmark = pytest.mark.integration
KEEPALIVE_S = 1


@dataclass
class Served:
    url: str
    port: int
    backend: FakeBackend
    log: Path


@pytest.fixture
def served(env: ClusterEnv) -> Iterator[Served]:
    # 6 SSE events 0.5 s apart: a relay that buffered would deliver them all at 3 s.
    backend, _ = serve_in_thread(service_ms=3000, stream_chunks=6, served_model_name="paced")
    env.cluster.registry.create(
        EngineRecord(
            id="eng-paced",
            spec=EngineSpec(model="org/Paced-1B", served_model_name="paced"),
            state=EngineState.RUNNING,
            host="a",
            address="127.0.0.1",
            port=backend.port,
            last_health_at=time.time(),
        )
    )
    port = free_port("127.0.0.1")
    # With the access log on: the rest of the suite runs production's default (off).
    argv = gunicorn_argv(f"127.0.0.1:{port}", workers=1, access_log=True)
    argv[-1:-1] = ["--keep-alive", str(KEEPALIVE_S)]  # the last --keep-alive wins
    log = (env.tmp / "gunicorn.log").open("wb")
    proc = subprocess.Popen(argv, env=env.env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _listed(url, "paced"), 60, what=f"gunicorn on {url} (see {log.name})")
        yield Served(url, port, backend, env.tmp / "gunicorn.log")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        backend.stop()
    output = (env.tmp / "gunicorn.log").read_text()
    assert "Traceback" not in output, output[-3000:]


def _listed(url: str, name: str) -> bool:
    try:
        return name in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    except httpx.HTTPError:
        return False


def _chat(stream: bool) -> dict[str, object]:
    return {"model": "paced", "stream": stream, "messages": [{"role": "user", "content": "x"}]}


def test_streams_are_relayed_event_by_event_and_replies_whole(served: Served) -> None:
    t0 = time.monotonic()
    arrivals: list[tuple[float, bytes]] = []
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=_chat(True)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-sagellm-engine"] == "eng-paced"
        for piece in r.iter_raw():
            arrivals.append((time.monotonic() - t0, piece))
    body = b"".join(p for _, p in arrivals)
    assert body.count(b"data: {") == 6 and body.endswith(b"data: [DONE]\n\n")
    # the first event left the backend at 0.5 s and must not wait for the last (3 s)
    assert arrivals[0][0] < 1.2 and b"data: {" in arrivals[0][1]
    assert len(arrivals) >= 5 and arrivals[-1][0] >= 2.8

    r = httpx.post(f"{served.url}/v1/chat/completions", json=_chat(False), timeout=10)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    wait_until(
        lambda: served.log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200') == 2,
        5,
        what="both requests in the access log",
    )


def test_a_client_that_goes_away_mid_stream_closes_the_upstream(served: Served) -> None:
    assert not served.backend.connections
    t0 = time.monotonic()
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=_chat(True)) as r:
        next(r.iter_raw())
        assert len(served.backend.connections) == 1
    # We hung up after the first event (0.5 s). A WSGI server learns that when a write
    # fails, one or two events later; the engine must be let go long before its
    # stream would end (3 s; a finished stream's connection would stay pooled).
    wait_until(lambda: not served.backend.connections, 2.2, what="the upstream closed")
    assert time.monotonic() - t0 < 2.8


def test_idle_keep_alive_connections_are_closed_after_keep_alive_seconds(
    served: Served,
) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as idle:
        t0 = time.monotonic()
        assert idle.recv(1) == b""  # closed by the server, not by our timeout
        assert KEEPALIVE_S * 0.8 <= time.monotonic() - t0 < KEEPALIVE_S + 3
    with httpx.Client(base_url=served.url) as client:
        assert client.get("/v1/models").status_code == 200  # served on a fresh connection


def _raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        reply = b""
        while b"\r\n\r\n" not in reply:
            more = s.recv(65536)
            if not more:
                break
            reply += more
        return reply


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + b"X-H: v\r\n" * 150 + b"\r\n", b"400"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", b"414"),
        (b"garbage\r\n\r\n", b"400"),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
            b"400",
        ),
        (b"GET /v1/models HTTP/1.1\r\nHost : x\r\n\r\n", b"400"),
        (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n  folded\r\n\r\n", b"400"),
        (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX(A): 1\r\n\r\n", b"400"),
        (
            b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-A: " + b"a" * 70000 + b"\r\n\r\n",
            b"400",
        ),
    ],
    ids=[
        "too-many-headers",
        "long-request-line",
        "garbage",
        "two-content-lengths",
        "space-before-colon",
        "obsolete-folding",
        "not-a-token",
        "header-line-over-64k",
    ],
)
def test_malformed_requests_get_a_4xx_and_the_server_keeps_serving(
    served: Served, request_bytes: bytes, status: bytes
) -> None:
    reply = _raw_exchange(served.port, request_bytes)
    assert reply.split(b" ", 2)[1] == status, reply[:200]
    assert _listed(served.url, "paced")


def test_a_chunked_request_body_is_proxied(served: Served) -> None:
    body = json.dumps(_chat(False)).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n"
        % (len(body), body)
    )
    reply = _raw_exchange(served.port, request)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
