"""``sagellm engine events``: the engine's timeline through the real API over HTTP."""

from __future__ import annotations

import json

import redis

from app.core.models import EngineState
from app.state.registry import Registry
from tests.unit.cli_harness import add_host, api_url, only_engine_id, run

__all__ = ["api_url"]  # the fixture


def test_engine_events_shows_the_timeline_oldest_first(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    run("engine", "start", "m", "--memory-gb", "1", "--label", "chat", "--no-wait")
    eid = only_engine_id(real_redis)
    reg = Registry(real_redis)
    reg.update(eid, lambda r: r.transition(EngineState.STARTING))
    reg.events.add(eid, "spawned", "spawned pid 4242", pid=4242)
    res = run("engine", "events", "chat")  # by label, like every engine command
    assert res.exit_code == 0, res.output
    header, *rows = res.output.splitlines()
    assert header.split() == ["TIME", "KIND", "MESSAGE"]
    assert [r.split(maxsplit=3)[2:] for r in rows] == [
        ["placed", "placed on host a, GPUs 0, port 8100, 1.0 GB/GPU"],
        ["state", "PENDING -> STARTING"],
        ["spawned", "spawned pid 4242"],
    ]
    data = json.loads(run("engine", "events", eid, "-o", "json").output)
    assert [e["kind"] for e in data] == ["placed", "state", "spawned"]
    assert data[2]["data"] == {"pid": 4242}


def test_engine_events_of_an_unknown_engine_fails(api_url: str, real_redis: redis.Redis) -> None:
    res = run("engine", "events", "eng-nope")
    assert res.exit_code != 0
