"""The CLI follows engines without polling: it asks the API again only once the API
answered that something changed (a long-poll), so the number of requests is the number
of changes, however long they take. The real API over HTTP on a real redis-server; a
fake worker moves the engines."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import redis

from app.core.models import EngineState
from app.dev.redis_server import RedisProcess
from app.state.registry import Registry
from tests.unit.cli_harness import (
    STEPS_TO_RUNNING,
    FakeWorker,
    add_host,
    api_app,
    followed_steps,
    only_engine_id,
    run,
    served_to_cli,
    start_with_worker,
)

S = EngineState
STEP_S = 1.5  # each state lasts this long: a 0.5 s poll would ask 3 times per state


class Counted:
    """WSGI middleware: counts (method, path) of the requests the API served, and keeps
    (query, X-Sagellm-Seq answered) of each list read."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.seen: Counter[tuple[str, str]] = Counter()
        self.lists: list[tuple[dict[str, list[str]], int]] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        with self.lock:
            self.seen[(method, path)] += 1
        if (method, path) != ("GET", "/v1/management/engines"):
            return self.app(environ, start_response)
        query = parse_qs(environ.get("QUERY_STRING", ""))

        def start(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            seq = dict(headers).get("X-Sagellm-Seq")
            with self.lock:
                self.lists.append((query, int(seq) if seq else 0))
            return start_response(status, headers, *exc)

        return self.app(environ, start)

    def count(self, method: str, prefix: str) -> int:
        with self.lock:
            return sum(n for (m, p), n in self.seen.items() if m == method and p.startswith(prefix))


@pytest.fixture
def counted_api(
    redis_server: RedisProcess,
    real_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Counted]:
    app = api_app(redis_server, tmp_path)
    counted = Counted(app.wsgi_app)
    app.wsgi_app = counted  # type: ignore[method-assign]
    with served_to_cli(app, monkeypatch, tmp_path, host="127.0.30.1"):
        yield counted


def slow_worker(r: redis.Redis) -> FakeWorker:
    worker = FakeWorker(r)
    worker.step_s = STEP_S
    return worker


def test_engine_start_asks_once_per_change_and_shows_each_at_once(
    counted_api: Counted, real_redis: redis.Redis
) -> None:
    res, eid = start_with_worker(real_redis, slow_worker(real_redis))
    assert followed_steps(res.output) == STEPS_TO_RUNNING
    # Two changes took 2 x 1.5 s: one long-poll answered each, and one more may have
    # been sent before the CLI ended (polling every 0.5 s would have asked ~6 times).
    reads = counted_api.count("GET", f"/v1/management/engines/{eid}")
    assert 2 <= reads <= 3, counted_api.seen


def test_engine_stop_and_restart_follow_by_long_poll(
    counted_api: Counted, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    run("engine", "start", "m", "--memory-gb", "1", "--no-wait")
    eid = only_engine_id(real_redis)
    reg = Registry(real_redis)
    reg.transition(eid, S.STARTING, pid=4242)
    reg.transition(eid, S.RUNNING)
    with slow_worker(real_redis):
        res = run("engine", "stop", eid, "--no-drain", "--timeout", "30")
    assert res.exit_code == 0, res.output
    assert f"engine {eid}: STOPPED" in res.output
    # STOPPING -> STOPPED after 1.5 s: one long-poll answered it
    assert counted_api.count("GET", f"/v1/management/engines/{eid}") <= 2, counted_api.seen


def test_preset_apply_progress_follows_the_list_by_long_poll(
    counted_api: Counted, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "none")
    with slow_worker(real_redis):
        t0 = time.monotonic()
        res = run("preset", "apply", "-n", "cpu-demo", "--yes", "--timeout", "30")
        took = time.monotonic() - t0
    assert res.exit_code == 0, res.output
    ids = {e.spec.preset_engine: e.id for e in Registry(real_redis).engines()}
    for name in ("tiny-chat", "minilm"):
        assert f"{name} ({ids[name]}): STARTING (pid 4242)" in res.stdout
        assert f"{name} ({ids[name]}): RUNNING at http://127.0.0.1:" in res.stdout
    # The list was read plainly before and after the apply (and to resolve nothing
    # else); every other read was a long-poll the API answered because a record was
    # written, never one that found nothing new (the apply took ~3 s: a timer would).
    plain = [seq for query, seq in counted_api.lists if "changed_after" not in query]
    polls = [(int(q["changed_after"][0]), seq) for q, seq in counted_api.lists if q]
    assert len(plain) == 2, (took, counted_api.lists)
    assert len(polls) >= 3 and all(seq > after for after, seq in polls), counted_api.lists
