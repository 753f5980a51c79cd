"""Long-polls of the management API as production serves it (gunicorn, the gevent
worker of ``app.gateway.server``) on a real redis-server: ``GET /engines/{id}?
changed_from=<updated_at>`` and ``GET /engines?changed_after=<X-Sagellm-Seq>`` answer
within milliseconds of a write by another client, at their timeout otherwise, and hold
no worker while they wait; bad parameters are refused naming the field."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from app.core.models import EngineState
from app.dev.redis_server import RedisProcess
from app.state.client import connect
from app.state.registry import Registry
from tests.integration.harness import base_env, gunicorn_api
from tests.integration.test_api import add_host
from tests.integration.test_engine_changes import new_engine

pytestmark = pytest.mark.integration
S = EngineState
ADDRESS = "127.0.30.1"
PORTS = range(18450, 18500)
E = "/v1/management/engines"


def free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind((ADDRESS, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS} on {ADDRESS}")


@dataclass
class Api:
    url: str
    r: redis.Redis  # the API's Redis

    def get(self, path: str, **params: Any) -> httpx.Response:
        """``params`` go in the query (``timeout`` too: the long-poll's)."""
        return httpx.get(f"{self.url}{path}", params=params, timeout=70)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One gunicorn for the module (its start takes seconds), one worker process: a
    waiting long-poll must not hold it."""
    tmp = tmp_path_factory.mktemp("long-poll")
    server = RedisProcess(tmp / "redis", persist=False).start()
    port = free_port()
    url = f"http://{ADDRESS}:{port}"
    environ = base_env(server.url, tmp / "data", SAGELLM_API_URL=url)
    client = connect(server.url)
    try:
        with gunicorn_api(environ, tmp / "gunicorn.log", ADDRESS, port, workers=1) as served_url:
            yield Api(served_url, client)
    finally:
        client.close()
        server.stop()


@pytest.fixture
def api(served: Api) -> Api:
    served.r.flushall()
    return served


def _write_later(registry: Registry, eid: str, delay_s: float, n: int) -> dict[str, float]:
    """After ``delay_s``, one write of ``eid``'s record; "at": when it was sent."""
    done: dict[str, float] = {}

    def run() -> None:
        time.sleep(delay_s)
        done["at"] = time.monotonic()
        registry.update(eid, lambda r: setattr(r, "restart_count", n))

    threading.Thread(target=run, daemon=True).start()
    return done


def test_a_write_wakes_the_long_poll_of_a_record_within_milliseconds(api: Api) -> None:
    r = api.r
    add_host(r, "a", "1x80")
    eid = new_engine(r, "eng-1").id
    other = Registry(r)
    late = []
    for n in range(1, 8):
        have = api.get(f"{E}/{eid}").json()
        wrote = _write_later(other, eid, 0.2, n)
        resp = api.get(f"{E}/{eid}", changed_from=have["updated_at"], timeout=10)
        answered = time.monotonic()
        assert resp.status_code == 200 and resp.json()["restart_count"] == n
        late.append(answered - wrote["at"])
    # A wake-up is a publish and one read (a loaded 2-core machine can delay a thread
    # now and then: the median counts); a poll would be late by half its interval.
    assert statistics.median(late) < 0.02 and max(late) < 0.25, late


def test_a_long_poll_holds_no_worker_and_answers_at_its_timeout(api: Api) -> None:
    r = api.r
    add_host(r, "a", "1x80")
    eid = new_engine(r, "eng-1").id
    have = api.get(f"{E}/{eid}").json()
    result: dict[str, Any] = {}

    def long_poll() -> None:
        t0 = time.monotonic()
        result["resp"] = api.get(f"{E}/{eid}", changed_from=have["updated_at"], timeout=1.5)
        result["took"] = time.monotonic() - t0

    waiter = threading.Thread(target=long_poll)
    waiter.start()
    time.sleep(0.3)  # the long-poll is waiting now
    t0 = time.monotonic()
    assert api.get("/v1/management/status").status_code == 200
    assert time.monotonic() - t0 < 0.5  # served beside it, by the same worker
    waiter.join(10)
    assert result["resp"].status_code == 200 and result["resp"].json() == have
    assert 1.4 < result["took"] < 3.0


def test_the_list_long_poll_answers_the_next_write_with_its_number(api: Api) -> None:
    r = api.r
    add_host(r, "a", "2x80")
    new_engine(r, "eng-1")
    listed = api.get(E)
    seq = int(listed.headers["X-Sagellm-Seq"])
    # nothing written: the timeout, the same number
    t0 = time.monotonic()
    quiet = api.get(E, changed_after=seq, timeout=0.5)
    assert 0.45 < time.monotonic() - t0 < 2.0
    assert int(quiet.headers["X-Sagellm-Seq"]) == seq and quiet.json() == listed.json()
    # a new engine: answered at once, with it and a later number
    threading.Timer(0.2, lambda: new_engine(r, "eng-2")).start()
    t0 = time.monotonic()
    woke = api.get(E, changed_after=seq, timeout=10)
    assert time.monotonic() - t0 < 1.0
    assert int(woke.headers["X-Sagellm-Seq"]) > seq
    assert [e["id"] for e in woke.json()] == ["eng-1", "eng-2"]


def test_a_record_deleted_while_waited_on_is_404(api: Api) -> None:
    r = api.r
    add_host(r, "a", "1x80")
    eid = new_engine(r, "eng-1").id
    have = api.get(f"{E}/{eid}").json()
    threading.Timer(0.2, lambda: Registry(r).delete(eid)).start()
    resp = api.get(f"{E}/{eid}", changed_from=have["updated_at"], timeout=10)
    assert resp.status_code == 404


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        (f"{E}/eng-1", {"changed_from": "yesterday"}, "changed_from"),
        (f"{E}/eng-1", {"changed_from": "nan"}, "changed_from"),
        (f"{E}/eng-1", {"changed_from": "1.5", "timeout": "3600"}, "timeout"),
        (f"{E}/eng-1", {"changed_from": "1.5", "timeout": "-1"}, "timeout"),
        (f"{E}/eng-1", {"timeout": "5"}, "timeout"),
        (E, {"changed_after": "-3"}, "changed_after"),
        (E, {"changed_after": "1.5"}, "changed_after"),
        (E, {"timeout": "5"}, "timeout"),
    ],
)
def test_bad_long_poll_parameters_are_refused_naming_the_field(
    api: Api, path: str, params: dict[str, str], field: str
) -> None:
    r = api.r
    add_host(r, "a", "1x80")
    new_engine(r, "eng-1")
    t0 = time.monotonic()
    resp = api.get(path, **params)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 1.0  # refused before any wait
    assert resp.status_code in (400, 422), resp.text
    body = resp.json()
    assert body["field"] == field and body["message"].startswith(f"{field}:"), body
