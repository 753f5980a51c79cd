"""On-demand engines on real processes: the API as production serves it (gunicorn, two
gevent worker processes, each with its own gateway), a real host worker, the stand-in
``vllm`` (ready ~0.7 s after spawn), mock GPUs.

* 50 concurrent requests for a STANDBY model through both gateway processes start
  exactly one engine, and all 50 succeed;
* an engine with ``idle_timeout_s`` goes back to STANDBY after its last request (room
  released, process gone) and the next request starts it again;
* on a GPU with room for one 50 GB engine, a request for B evicts idle A and a request
  for A then evicts B; with A busy (a stream in flight), B's request gets a 503 with
  the reason and A's stream completes;
* bad input is a 4xx with nothing recorded.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.errors import ValidationError
from app.core.models import EngineState
from app.core.spec import EngineSpec, load_spec
from app.dev.redis_server import free_port
from app.services.engines import start_engine
from tests.integration.harness import ClusterEnv, gunicorn_api, wait_until

pytestmark = pytest.mark.integration
S = EngineState


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[ClusterEnv, str]]:
    """One host with one 80 GB GPU (room for one 50 GB engine), a worker, gunicorn."""
    env = ClusterEnv.create(
        tmp_path,
        SAGELLM_MOCK_GPUS="1x80",
        SAGELLM_PORT_RANGE="18560-18579",
        SAGELLM_IDLE_CHECK_S="0.5",
        SAGELLM_DRAIN_TIMEOUT_S="10",
    )
    env.start_worker("a")
    try:
        with gunicorn_api(
            env.env,
            tmp_path / "gunicorn.log",
            "127.0.0.1",
            free_port("127.0.0.1"),
            workers=2,
            ready_path="/v1/models",
        ) as url:
            yield env, url
    finally:
        env.close()


def _standby(env: ClusterEnv, name: str, gb: float = 50, **kw: Any) -> str:
    spec = EngineSpec(
        model=f"org/{name}-7B",
        served_model_name=name,
        required_memory_gb=gb,
        on_demand=True,
        **kw,
    )
    rec = start_engine(env.cluster, spec)
    assert rec.state is S.STANDBY and rec.host is None and rec.port is None
    assert env.cluster.ledger.reservation(rec.id) is None
    return rec.id


def _chat(url: str, model: str, timeout: float = 60) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def _starts(env: ClusterEnv) -> list[dict[str, Any]]:
    path = env.tmp / "vllm-calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_fifty_concurrent_requests_for_a_standby_model_start_exactly_one_engine(
    stack: tuple[ClusterEnv, str],
) -> None:
    env, url = stack
    eid = _standby(env, "cold", gb=20)
    models = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
    assert [(m["id"], m.get("status")) for m in models] == [("cold", "standby")]
    with cf.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda _: _chat(url, "cold"), range(50)))
    codes = [a.status_code for a in answers]
    assert codes == [200] * 50, [a.text[:200] for a in answers if a.status_code != 200][:3]
    assert {a.headers["X-Sagellm-Engine"] for a in answers} == {eid}
    assert len(_starts(env)) == 1, _starts(env)
    rec = env.get(eid)
    assert rec.state is S.RUNNING and rec.cold_start_s is not None and rec.cold_start_s > 0
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert "sagellm_cold_starts_total 1.0" in metrics, metrics[-2000:]


def test_an_idle_engine_goes_back_to_standby_and_the_next_request_starts_it_again(
    stack: tuple[ClusterEnv, str],
) -> None:
    env, url = stack
    eid = _standby(env, "idle", gb=20, idle_timeout_s=3)
    r = _chat(url, "idle")
    assert r.status_code == 200, r.text
    last = time.monotonic()
    rec = env.get(eid)
    assert rec.state is S.RUNNING
    pid = rec.pid
    # the countdown, as the host's idle check writes it and /metrics shows it
    wait_until(lambda: env.get(eid).idle_stops_at is not None, 3, what="the countdown")
    assert (
        f'sagellm_engine_idle_stop_seconds{{engine="{eid}",model="idle"}}'
        in httpx.get(f"{url}/metrics", timeout=5).text
    )
    wait_until(lambda: env.get(eid).state is S.STANDBY, 15, what="idle stop to STANDBY")
    took = time.monotonic() - last
    # the timeout, one check interval, the drain's own tick, and the stop itself
    assert 3.0 <= took <= 3.0 + 0.5 + 2.5, took
    rec = env.get(eid)
    assert rec.host is None and rec.pid is None
    assert env.cluster.ledger.reservation(eid) is None
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
    kinds = [e["kind"] for e in env.cluster.registry.events.list(eid)]
    assert "idle_stop" in kinds, kinds
    assert "sagellm_idle_stops_total 1.0" in httpx.get(f"{url}/metrics", timeout=5).text
    r = _chat(url, "idle")
    assert r.status_code == 200, r.text
    assert env.get(eid).state is S.RUNNING
    assert len(_starts(env)) == 2


def test_a_request_for_b_evicts_idle_a_and_a_request_for_a_evicts_b(
    stack: tuple[ClusterEnv, str],
) -> None:
    env, url = stack
    a = _standby(env, "model-a")
    b = _standby(env, "model-b")
    assert _chat(url, "model-a").status_code == 200
    assert env.get(a).state is S.RUNNING
    r = _chat(url, "model-b")
    assert r.status_code == 200, r.text
    assert env.get(b).state is S.RUNNING
    wait_until(lambda: env.get(a).state is S.STANDBY, 15, what="A back on STANDBY")
    events_a = [e["kind"] for e in env.cluster.registry.events.list(a)]
    assert "evicted" in events_a, events_a
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert "sagellm_evictions_total 1.0" in metrics and "sagellm_cold_starts_total 2.0" in metrics
    r = _chat(url, "model-a")
    assert r.status_code == 200, r.text
    assert env.get(a).state is S.RUNNING
    wait_until(lambda: env.get(b).state is S.STANDBY, 15, what="B back on STANDBY")
    assert env.cluster.ledger.reservation(b) is None


def test_a_busy_engine_is_not_evicted_its_stream_completes(
    stack: tuple[ClusterEnv, str],
) -> None:
    env, url = stack
    a = _standby(env, "busy-a", extra_args=("--fake-reply-delay-s", "2"))
    _standby(env, "busy-b")
    assert _chat(url, "busy-a").status_code == 200  # A is up (its reply took ~2 s)
    body = {"model": "busy-a", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    chunks: list[str] = []
    with cf.ThreadPoolExecutor(1) as pool:

        def stream() -> int:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
                chunks.extend(line for line in resp.iter_lines() if line.startswith("data: "))
                return resp.status_code

        running = pool.submit(stream)
        wait_until(lambda: bool(chunks), 10, what="A's stream under way")
        time.sleep(0.3)  # its in-flight count is published every 0.1 s
        r = _chat(url, "busy-b", timeout=30)
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "has requests in flight: not evicted" in message, message
        assert running.result(30) == 200
    assert chunks[-1] == "data: [DONE]"
    assert env.get(a).state is S.RUNNING


def test_bad_on_demand_input_is_refused_with_the_field_and_nothing_is_recorded(
    stack: tuple[ClusterEnv, str],
) -> None:
    env, _ = stack
    with pytest.raises(ValidationError) as caught:
        load_spec({"model": "org/m", "idle_timeout_s": -1})
    assert caught.value.field == "idle_timeout_s"
    too_big = EngineSpec(model="org/m", required_memory_gb=100, gpu_ids=(0,), on_demand=True)
    with pytest.raises(ValidationError) as caught:
        start_engine(env.cluster, too_big)
    assert caught.value.field == "gpu_ids", caught.value.message
    assert "would not fit" in caught.value.message
    assert env.cluster.registry.engines() == []
