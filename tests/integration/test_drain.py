"""Drain before stop, on real processes: the API as production serves it (gunicorn, two
gevent worker processes, each with its own gateway), a real worker, and two replicas
of the stand-in ``vllm`` whose streams are slow.

Stopping a replica lets every stream it serves finish; every new request meanwhile
goes to the other; a drain that times out stops anyway and says so in the events;
``?drain=false`` stops at once; an engine that serves nothing is stopped as before.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from app.core.models import EngineState
from app.core.spec import EngineSpec
from app.dev.redis_server import free_port
from app.services.engines import reserve_engine, start_engine, wait_for_state
from app.state.events import EngineEvents
from tests.integration.harness import ClusterEnv, gunicorn_api

pytestmark = pytest.mark.integration
S = EngineState
ENGINES = "/v1/management/engines"
STREAM_S = 3.0  # each stream: 5 chunks over this long


@dataclass
class Api:
    url: str


@pytest.fixture
def api(env: ClusterEnv) -> Iterator[Api]:
    """gunicorn with two gateway processes, at the default refresh interval (1 s): a
    process learns of a drain from the record-change channel, not by re-reading."""
    env.start_worker("a")
    with gunicorn_api(
        env.env,
        env.tmp / "gunicorn.log",
        "127.0.0.1",
        free_port("127.0.0.1"),
        workers=2,
        ready_path="/v1/models",
    ) as url:
        yield Api(url)


def _replica(env: ClusterEnv, delay: float = STREAM_S) -> str:
    spec = EngineSpec(
        model="org/Rep-1B",
        served_model_name="rep",
        required_memory_gb=8,
        extra_args=("--fake-reply-delay-s", str(delay)),
    )
    rec = wait_for_state(env.cluster, start_engine(env.cluster, spec).id, [S.RUNNING], 60)
    assert rec.state is S.RUNNING, rec.last_error
    return rec.id


@dataclass
class Stream:
    """One streamed chat completion through the gateway, read to its end in a thread."""

    url: str
    engine: str = ""
    chunks: int = 0
    done: bool = False
    error: str = ""
    started: threading.Event = field(default_factory=threading.Event)
    finished_at: float = 0.0

    def run(self) -> Stream:
        body = {"model": "rep", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/chat/completions", json=body, timeout=30
            ) as r:
                self.engine = r.headers.get("X-Sagellm-Engine", "")
                if r.status_code != 200:
                    self.error = f"HTTP {r.status_code}: {r.read().decode()[:300]}"
                    return self
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        json.loads(line[6:])
                        self.chunks += 1
                        self.started.set()
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished_at = time.time()
            self.started.set()
        return self

    @property
    def complete(self) -> bool:
        return self.done and self.chunks == 5 and not self.error


def _streams(pool: cf.ThreadPoolExecutor, url: str, n: int) -> list[Stream]:
    streams = [Stream(url) for _ in range(n)]
    for s in streams:
        pool.submit(s.run)
    for s in streams:
        assert s.started.wait(15), "a stream never started"
    return streams


def _events(env: ClusterEnv, engine_id: str) -> list[dict[str, object]]:
    return EngineEvents(env.cluster.registry.r).list(engine_id)


def _state_at(events: list[dict[str, object]], state: str) -> float:
    """When the engine entered ``state`` (the record write's own event)."""
    return next(float(str(e["at"])) for e in events if e["kind"] == "state" and e["to"] == state)


def test_stopping_a_replica_lets_every_stream_finish_and_sends_new_ones_to_the_other(
    env: ClusterEnv, api: Api
) -> None:
    a, b = _replica(env), _replica(env)
    with cf.ThreadPoolExecutor(40) as pool:
        streams = _streams(pool, api.url, 16)
        on = Counter(s.engine for s in streams)
        assert set(on) == {a, b}, [(s.engine, s.error) for s in streams]  # both serve
        # The one with fewer streams: a gateway that did not know of its drain would
        # send it the next requests (least outstanding).
        victim = min(on, key=lambda e: on[e])
        other = b if victim == a else a

        asked = time.time()
        rec = httpx.delete(f"{api.url}{ENGINES}/{victim}", timeout=10).json()
        assert rec["state"] == "DRAINING", rec
        # New requests while it drains: the first 100 ms may meet a gateway process
        # that has not heard yet (they must still finish); after that none goes to it.
        early = [pool.submit(Stream(api.url).run) for _ in range(4)]
        time.sleep(0.1)
        late = [pool.submit(Stream(api.url).run) for _ in range(12)]
        during = [f.result(30) for f in early + late]
        for s in streams:
            while not s.finished_at:
                time.sleep(0.05)

    broken = [(s.engine, s.chunks, s.error) for s in streams + during if not s.complete]
    assert not broken, f"requests failed during the drain: {broken}"
    assert all(s.engine == other for s in during[len(early) :]), Counter(s.engine for s in during)
    final = wait_for_state(env.cluster, victim, [S.STOPPED], 30)
    assert final.state is S.STOPPED
    events = _events(env, victim)
    kinds = [e["kind"] for e in events]
    assert "draining" in kinds and "drain_timeout" not in kinds, kinds
    # It was signalled only once its last stream had ended, and not long after.
    stopping = _state_at(events, "STOPPING")
    last_end = max(s.finished_at for s in streams if s.engine == victim)
    assert stopping >= last_end - 0.05, (stopping, last_end)
    assert stopping - last_end < 1.0, f"the drain ended {stopping - last_end:.2f}s late"
    assert _state_at(events, "DRAINING") - asked < 0.5
    assert env.get(other).state is S.RUNNING


def test_a_drain_that_times_out_stops_anyway_and_says_so(env: ClusterEnv, api: Api) -> None:
    eid = _replica(env, delay=10.0)
    with cf.ThreadPoolExecutor(4) as pool:
        (stream,) = _streams(pool, api.url, 1)
        asked = time.monotonic()
        r = httpx.delete(f"{api.url}{ENGINES}/{eid}", params={"drain_timeout": 1}, timeout=10)
        assert r.json()["state"] == "DRAINING"
        final = wait_for_state(env.cluster, eid, [S.STOPPED], 20)
        took = time.monotonic() - asked
    assert final.state is S.STOPPED
    assert 1.0 <= took < 6.0, took
    assert not stream.complete  # it was cut: the deadline is a deadline
    timeouts = [e for e in _events(env, eid) if e["kind"] == "drain_timeout"]
    assert len(timeouts) == 1 and timeouts[0]["in_flight"] == 1, timeouts
    assert "stopping anyway" in str(timeouts[0]["message"])


def test_drain_false_stops_at_once(env: ClusterEnv, api: Api) -> None:
    eid = _replica(env, delay=10.0)
    with cf.ThreadPoolExecutor(4) as pool:
        (stream,) = _streams(pool, api.url, 1)
        asked = time.monotonic()
        r = httpx.delete(f"{api.url}{ENGINES}/{eid}", params={"drain": "false"}, timeout=10)
        assert r.json()["state"] == "STOPPING"
        final = wait_for_state(env.cluster, eid, [S.STOPPED], 20)
        took = time.monotonic() - asked
    assert final.state is S.STOPPED and took < 3.0, took
    assert not stream.complete
    assert "draining" not in [e["kind"] for e in _events(env, eid)]


def test_a_second_stop_without_drain_ends_a_drain_under_way(env: ClusterEnv, api: Api) -> None:
    eid = _replica(env, delay=10.0)
    with cf.ThreadPoolExecutor(4) as pool:
        _streams(pool, api.url, 1)
        r = httpx.delete(f"{api.url}{ENGINES}/{eid}", timeout=10)
        assert r.json()["state"] == "DRAINING"
        asked = time.monotonic()
        r = httpx.delete(f"{api.url}{ENGINES}/{eid}", params={"drain": "false"}, timeout=10)
        assert r.json()["state"] == "STOPPING"
        final = wait_for_state(env.cluster, eid, [S.STOPPED], 20)
    assert final.state is S.STOPPED and time.monotonic() - asked < 3.0


def test_an_engine_that_serves_nothing_is_stopped_as_before(env: ClusterEnv, api: Api) -> None:
    spec = EngineSpec(model="org/Rep-1B", served_model_name="rep", required_memory_gb=8)
    pending = reserve_engine(env.cluster, spec)  # PENDING: never launched
    r = httpx.delete(f"{api.url}{ENGINES}/{pending.id}", timeout=10)
    assert r.status_code == 202 and r.json()["state"] == "STOPPING"
    assert wait_for_state(env.cluster, pending.id, [S.STOPPED], 20).state is S.STOPPED
    kinds = [e["kind"] for e in _events(env, pending.id)]
    assert "draining" not in kinds
    # A drain of 0 s is no drain: a running engine is STOPPING at once.
    eid = _replica(env, delay=0.0)
    r = httpx.delete(f"{api.url}{ENGINES}/{eid}", params={"drain_timeout": 0}, timeout=10)
    assert r.json()["state"] == "STOPPING"
    assert wait_for_state(env.cluster, eid, [S.STOPPED], 20).state is S.STOPPED


def test_cli_stop_shows_the_drain_and_no_drain_stops_at_once(
    env: ClusterEnv, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from app.cli import sagellm

    monkeypatch.setenv("SAGELLM_API_URL", api.url)
    for name, value in env.env.items():
        if name.startswith("SAGELLM_") and name != "SAGELLM_API_URL":
            monkeypatch.setenv(name, value)
    drained, cut = _replica(env, delay=1.5), _replica(env, delay=10.0)
    with cf.ThreadPoolExecutor(8) as pool:
        streams = _streams(pool, api.url, 6)
        assert {s.engine for s in streams} == {drained, cut}
        res = CliRunner().invoke(
            sagellm, ["engine", "stop", drained, "--drain-timeout", "20"], catch_exceptions=False
        )
        assert res.exit_code == 0, res.output
        assert "DRAINING: no new request" in res.output
        assert f"engine {drained}: STOPPED" in res.output
        res = CliRunner().invoke(
            sagellm, ["engine", "stop", cut, "--no-drain", "--no-wait"], catch_exceptions=False
        )
        assert res.exit_code == 0, res.output
        assert f"engine {cut}: STOPPING" in res.output
        for s in streams:
            while not s.finished_at:
                time.sleep(0.05)
    assert all(s.complete for s in streams if s.engine == drained), streams
    assert wait_for_state(env.cluster, cut, [S.STOPPED], 20).state is S.STOPPED
