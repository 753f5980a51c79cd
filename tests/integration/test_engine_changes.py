"""Change notifications, engine timelines and fast status on a real redis-server.

Every record write publishes on ``keys.ENGINE_CHANGES`` and appends state changes to
the engine's timeline in the same atomic step; ``Registry.wait`` wakes on it instead
of polling; the status views read Redis in a fixed number of round trips."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from app import create_app
from app.core.errors import NotFoundError
from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.dev.redis_server import RedisProcess
from app.settings import Settings
from app.state import keys
from app.state.allocation import allocate
from app.state.client import connect
from app.state.events import MAX_EVENTS, encode_event
from app.state.ledger import Ledger
from app.state.registry import Registry
from tests.integration.test_api import add_host

pytestmark = pytest.mark.integration
S = EngineState
E = "/v1/management/engines"


def new_engine(r: redis.Redis, eid: str = "eng-1", **spec: Any) -> EngineRecord:
    s = EngineSpec.from_dict({"model": "m", "required_memory_gb": 1, **spec})
    _, rec = allocate(
        eid, s, Registry(r), Ledger(r), policy="spread", margin_mib=0, record=EngineRecord(eid, s)
    )
    return rec


def later(delay_s: float, action: Callable[[], Any]) -> dict[str, float]:
    """Run ``action`` in a thread after ``delay_s``; the returned dict gets the time it
    was started ("at") once it has been."""
    done: dict[str, float] = {}

    def run() -> None:
        time.sleep(delay_s)
        done["at"] = time.monotonic()
        action()

    threading.Thread(target=run, daemon=True).start()
    return done


@pytest.fixture
def other(redis_server: RedisProcess, real_redis: redis.Redis) -> Iterator[Registry]:
    """A registry on its own connection: another process's writes."""
    client = connect(redis_server.url)
    yield Registry(client)
    client.close()


def test_wait_wakes_within_50ms_of_a_write_by_another_client(
    real_redis: redis.Redis, other: Registry
) -> None:
    add_host(real_redis, "a", "1x80")
    rec = new_engine(real_redis)
    late = []
    for _ in range(7):
        wrote = later(0.1, lambda: other.update(rec.id, lambda r: r.transition(S.STARTING)))
        got = Registry(real_redis).wait(rec.id, lambda r: r.state is S.STARTING, 10)
        late.append(time.monotonic() - wrote["at"])
        assert got.state is S.STARTING
        other.update(rec.id, lambda r: setattr(r, "state", S.PENDING))
    # Polling every 0.2 s would be ~0.1 s late on average; a wake-up is a round trip
    # (a loaded 2-core machine can delay one thread now and then: the median counts).
    late.sort()
    assert late[3] < 0.05 and late[-1] < 0.25, [f"{1000 * x:.1f} ms" for x in late]


def test_wait_ignores_other_engines_and_times_out_with_the_last_record(
    real_redis: redis.Redis, other: Registry
) -> None:
    add_host(real_redis, "a", "2x80")
    a, b = new_engine(real_redis, "eng-a"), new_engine(real_redis, "eng-b")
    later(0.05, lambda: other.update(b.id, lambda r: r.transition(S.STARTING)))
    t0 = time.monotonic()
    got = Registry(real_redis).wait(a.id, lambda r: r.state is S.STARTING, 0.5)
    assert got.state is S.PENDING and 0.45 < time.monotonic() - t0 < 1.5


def test_delete_wakes_a_waiter(real_redis: redis.Redis, other: Registry) -> None:
    add_host(real_redis, "a", "1x80")
    rec = new_engine(real_redis)
    deleted = later(0.2, lambda: other.delete(rec.id))
    with pytest.raises(NotFoundError):
        Registry(real_redis).wait(rec.id, lambda r: r.state is S.RUNNING, 10)
    assert time.monotonic() - deleted["at"] < 0.25  # a wake-up, not the 2 s re-read


def test_every_write_publishes_its_state_and_delete_publishes_deleted(
    real_redis: redis.Redis,
) -> None:
    add_host(real_redis, "a", "1x80")
    sub = real_redis.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.ENGINE_CHANGES)
    sub.get_message(timeout=1)
    reg = Registry(real_redis)
    rec = new_engine(real_redis)
    reg.update(rec.id, lambda r: r.transition(S.STARTING))
    reg.delete(rec.id)
    heard = []
    while (msg := sub.get_message(timeout=0.5)) is not None:
        heard.append(msg["data"])
    sub.close()
    notices = [json.loads(m) for m in heard]
    assert [(n["id"], n["state"]) for n in notices] == [
        ("eng-1", "PENDING"),
        ("eng-1", "STARTING"),
        ("eng-1", "DELETED"),
    ]
    # each write's number (app.state.write_seq): one more than the one before
    seqs = [n["seq"] for n in notices]
    assert seqs == list(range(seqs[0], seqs[0] + 3))


def test_timeline_has_the_placement_and_each_transition_in_order(real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "2x80")
    reg = Registry(real_redis)
    rec = new_engine(real_redis)
    reg.update(rec.id, lambda r: r.transition(S.STARTING))
    reg.events.add(rec.id, "spawned", "spawned pid 42", pid=42)
    reg.update(rec.id, lambda r: setattr(r, "pid", 42))  # no state change: no event
    reg.update(rec.id, lambda r: r.transition(S.FAILED, error="CUDA out of memory"))
    events = reg.events.list(rec.id)
    assert [e["kind"] for e in events] == ["placed", "state", "spawned", "state"]
    placed = events[0]
    assert placed["host"] == "a" and placed["gpus"] == [0] and placed["port"] == 8100
    assert placed["message"] == "placed on host a, GPUs 0, port 8100, 1.0 GB/GPU"
    assert events[1]["from"] == "PENDING" and events[1]["to"] == "STARTING"
    assert "last_error" not in events[1]
    failed = events[3]
    assert (failed["from"], failed["to"]) == ("STARTING", "FAILED")
    assert failed["last_error"] == "CUDA out of memory"
    assert failed["message"] == "STARTING -> FAILED: CUDA out of memory"
    times = [e["at"] for e in events]
    assert times == sorted(times)


def test_timeline_keeps_the_newest_events_and_goes_with_the_record(
    real_redis: redis.Redis,
) -> None:
    add_host(real_redis, "a", "1x80")
    reg = Registry(real_redis)
    rec = new_engine(real_redis)
    for i in range(MAX_EVENTS + 50):
        reg.events.add(rec.id, "probe_failed", f"probe {i}", attempt=i)
    events = reg.events.list(rec.id)
    assert len(events) == MAX_EVENTS
    assert [e["attempt"] for e in events] == list(range(50, MAX_EVENTS + 50))
    reg.update(rec.id, lambda r: r.transition(S.STARTING))  # the script bounds it too
    assert len(reg.events.list(rec.id)) == MAX_EVENTS
    assert reg.events.list(rec.id)[-1]["kind"] == "state"
    reg.delete(rec.id)
    assert not real_redis.exists(keys.engine_events(rec.id))
    reg.events.add(rec.id, "stopped", "late")  # no record: dropped, nothing resurrected
    assert not real_redis.exists(keys.engine_events(rec.id))


def test_events_given_with_a_write_go_in_the_same_step(real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "1x80")
    reg = Registry(real_redis)
    rec = new_engine(real_redis)
    scripts_before = real_redis.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    reg.update(
        rec.id,
        lambda r: r.transition(S.STARTING),
        events=lambda r: [encode_event("spawned", f"now {r.state.value}", pid=7)],
    )
    scripts = real_redis.info("commandstats")["cmdstat_evalsha"]["calls"] - scripts_before
    assert scripts == 1  # the record, its state event and the caller's: one write
    kinds = [(e["kind"], e["message"]) for e in reg.events.list(rec.id)][1:]
    assert kinds == [("state", "PENDING -> STARTING"), ("spawned", "now STARTING")]


# ------------------------------------------------------------------------- API + CLI


@pytest.fixture
def api(redis_server: RedisProcess, real_redis: redis.Redis) -> FlaskClient:
    settings = Settings.from_env(
        {"SAGELLM_REDIS_URL": redis_server.url, "SAGELLM_HOST_NAME": "api"}
    )
    app = create_app(settings)
    app.testing = True
    return app.test_client()


def test_events_endpoint_lists_the_timeline(api: FlaskClient, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "1x80")
    eid = api.post(E, json={"model": "m", "required_memory_gb": 1}).json["engine"]["id"]  # type: ignore[index]
    Registry(real_redis).update(eid, lambda r: r.transition(S.FAILED, error="boom"))
    body = api.get(f"{E}/{eid}/events").json
    assert body["engine_id"] == eid
    kinds = [(e["kind"], e["message"]) for e in body["events"]]
    assert kinds == [
        ("placed", "placed on host a, GPUs 0, port 8100, 1.0 GB/GPU"),
        ("state", "PENDING -> FAILED: boom"),
    ]
    assert body["events"][1]["data"] == {"from": "PENDING", "to": "FAILED", "last_error": "boom"}
    assert api.get(f"{E}/eng-nope/events").status_code == 404


def counting_round_trips(client: redis.Redis) -> list[str]:
    """Patch ``client``'s connections: every packet sent (one per command or pipeline:
    a round trip) is recorded."""
    sent: list[str] = []
    me = threading.get_ident()  # not the gateway process's reporting thread
    pool = client.connection_pool
    make = pool.make_connection

    def make_counted() -> Any:
        conn = make()
        send = conn.send_packed_command

        def counted(command: Any, check_health: bool = True) -> None:
            text = repr(command)
            # only this thread's reads of the cluster (not the gateway processes' reports,
            # which /backends also reads, and the reporting thread)
            reports = "gateway:report" in text or "SCAN" in text
            if threading.get_ident() == me and not reports:
                sent.append(text[:60])
            send(command, check_health)

        conn.send_packed_command = counted  # type: ignore[method-assign]
        return conn

    pool.disconnect()
    pool.make_connection = make_counted  # type: ignore[method-assign]
    return sent


@pytest.mark.parametrize("path", ["/status", "/engines", "/gpus", "/backends"])
def test_status_views_read_redis_in_round_trips_independent_of_engine_count(
    api: FlaskClient, real_redis: redis.Redis, path: str
) -> None:
    for h in range(2):
        add_host(real_redis, f"h{h}", "4x80")
    c = api.application.extensions["sagellm"]
    sent = counting_round_trips(c.registry.r)
    per_count = {}
    for n in (2, 40):
        while len(Registry(real_redis).engines()) < n:
            new_engine(real_redis, f"eng-{len(Registry(real_redis).engines()):03d}")
        api.get(f"/v1/management{path}")  # loads the script once
        sent.clear()
        r = api.get(f"/v1/management{path}")
        assert r.status_code == 200
        per_count[n] = len(sent)
    assert per_count[2] == per_count[40] == 1, (per_count, sent)


def test_status_answers_what_the_records_and_ledger_hold(
    api: FlaskClient, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    reg = Registry(real_redis)
    ids = [new_engine(real_redis, f"eng-{i}").id for i in range(3)]
    reg.update(ids[1], lambda r: r.transition(S.STARTING))
    body = api.get("/v1/management/status").json
    assert body["engines"] == [reg.get(i).to_dict() for i in ids]
    assert body["counts"] == {"PENDING": 2, "STARTING": 1}
    led = Ledger(real_redis)
    assert [r["engine_id"] for r in body["reservations"]] == sorted(ids)
    res = led.reservation(ids[0])
    assert res is not None
    assert body["reservations"][0]["gpus"] == [{"uuid": u, "memory_mib": m} for u, m in res.gpus]
    assert {(g["uuid"], g["reserved_mib"]) for g in body["gpus"]} == {
        (g.uuid, g.reserved_mib) for g in led.capacity("a")
    }
    # a record changed since the last read is read again, not served from the cache
    reg.update(ids[0], lambda r: r.transition(S.STARTING))
    again = api.get("/v1/management/status").json
    assert again["engines"][0]["state"] == "STARTING"
    assert again["counts"] == {"PENDING": 1, "STARTING": 2}
    listed = api.get(E, query_string={"state": "STARTING"}).json
    assert [e["id"] for e in listed] == [ids[0], ids[1]]
