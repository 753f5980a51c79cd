"""On-demand steps in one process (``tests.integration.inproc``): a cold start, an idle
stop and an eviction, each driven step by step, with the invariants after each; and a
request that waits on a cold start that a person stops."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from werkzeug.test import TestResponse

from app import create_app
from app.core.models import EngineState
from app.core.spec import EngineSpec
from app.services.engines import restart_engine, start_engine, stop_engine
from app.services.on_demand import wake_engine
from app.state import keys
from app.state.gateway_report import GatewayReport, GatewayReports
from tests.integration import test_issue10_regressions as base
from tests.integration.inproc import deliver, wait_for
from tests.integration.test_issue10_regressions import HOST, Env, becomes_running, invariants, take
from workers.agent.idle import check_idle

pytestmark = pytest.mark.integration
S = EngineState
# The in-process cluster of the issue 10 regressions (fixtures).
make_env = base.make_env
env = base.env


def _on_demand(env: Env, gb: float, idle: float | None = None) -> str:
    spec = EngineSpec(
        model="org/od", required_memory_gb=gb, host=HOST, on_demand=True, idle_timeout_s=idle
    )
    return start_engine(env.cluster, spec).id


def _cold_start(env: Env, engine_id: str) -> None:
    wake_engine(env.cluster, engine_id)
    deliver(env.ctx, take(env, "sagellm.start_engine", engine_id))
    assert becomes_running(env, engine_id), env.registry.get(engine_id)


def test_idle_check_stops_an_idle_engine_back_to_standby_and_releases_its_room(
    env: Env,
) -> None:
    eid = _on_demand(env, 8, idle=0.5)
    _cold_start(env, eid)
    invariants(env)
    assert check_idle(env.ctx, now=time.time()) == []  # not idle yet
    assert check_idle(env.ctx, now=time.time() + 60) == [eid]
    assert wait_for(lambda: env.registry.get(eid).state is S.STANDBY, 10)
    assert env.ledger.reservation(eid) is None
    invariants(env)


def test_idle_check_counts_the_reported_request_age_from_its_own_clock(env: Env) -> None:
    eid = _on_demand(env, 8, idle=10)
    _cold_start(env, eid)
    reports = GatewayReports(env.client)
    now = time.time() + 60  # the checker's clock, whatever the gateway's says
    reports.write("gw-test", GatewayReport(fresh=0, ages={eid: 5.0}))
    assert check_idle(env.ctx, now=now) == []  # a request 5 s ago: 5 s left
    assert env.registry.get(eid).idle_stops_at == pytest.approx(now + 5, abs=0.01)
    # its process gone, its report expired: the countdown in the record carries on
    env.client.delete(keys.gateway_report("gw-test"))
    assert check_idle(env.ctx, now=now + 4.9) == []
    assert check_idle(env.ctx, now=now + 5.1) == [eid]


def test_a_start_that_finds_no_room_evicts_the_idle_on_demand_engine(
    make_env: Callable[..., Env],
) -> None:
    env = make_env("1x24")
    victim = _on_demand(env, 14)
    _cold_start(env, victim)
    rec = start_engine(env.cluster, EngineSpec(model="org/m", required_memory_gb=14, host=HOST))
    assert rec.waits_for == [victim]
    v = env.registry.get(victim)
    assert v.state is S.DRAINING and v.evicted_for == rec.id
    invariants(env, settled=False)
    deliver(env.ctx, take(env, "sagellm.start_engine", rec.id))
    assert wait_for(lambda: env.registry.get(victim).state is S.STANDBY, 15)
    assert becomes_running(env, rec.id), env.registry.get(rec.id)
    invariants(env)


def test_a_restart_of_a_standby_engine_starts_it_now(env: Env) -> None:
    eid = _on_demand(env, 8)
    rec = restart_engine(env.cluster, eid)
    assert rec.state is S.PENDING and env.ledger.reservation(eid) is not None
    deliver(env.ctx, take(env, "sagellm.start_engine", eid))
    assert becomes_running(env, eid)
    invariants(env)


def test_a_stop_asked_for_during_an_idle_stop_ends_stopped_not_standby(env: Env) -> None:
    eid = _on_demand(env, 8, idle=0.5)
    _cold_start(env, eid)
    # The idle stop drains (a request in flight would hold it: simulate one).
    GatewayReports(env.client).write("gw-test", GatewayReport(fresh=0, in_flight={eid: 1}))
    assert check_idle(env.ctx, now=time.time() + 60) == []  # busy: not idle
    env.client.delete(keys.gateway_report("gw-test"))
    # being busy at +60 s was activity then: idle only a timeout after it
    assert check_idle(env.ctx, now=time.time() + 60.2) == []
    assert check_idle(env.ctx, now=time.time() + 61) == [eid]
    stop_engine(env.cluster, eid)  # a person's stop while it drains
    assert wait_for(lambda: env.registry.get(eid).state is S.STOPPED, 15)
    assert env.ledger.reservation(eid) is None
    invariants(env)


def test_a_request_waiting_on_a_cold_start_gets_503_when_a_person_stops_the_engine(
    env: Env,
) -> None:
    """The cold start it waits on will never end RUNNING: it is told so at the stop's
    write (the gateway's wait wakes on it), not after SAGELLM_COLD_START_TIMEOUT_S."""
    assert env.cluster.settings.cold_start_timeout_s == 600
    eid = _on_demand(env, 8)
    app = create_app(env.cluster.settings, celery=env.queue)  # type: ignore[arg-type]
    client = app.test_client()
    body = {"model": "org/od", "messages": [{"role": "user", "content": "hi"}]}
    answers: list[TestResponse] = []
    # a daemon thread: a request that hangs fails the test and does not hold pytest
    waiting = threading.Thread(
        target=lambda: answers.append(client.post("/v1/chat/completions", json=body)),
        daemon=True,
    )
    try:
        waiting.start()
        # its request woke the engine; its start is queued, not delivered yet
        assert wait_for(lambda: env.registry.get(eid).state is S.PENDING, 10)
        assert waiting.is_alive()
        stop_engine(env.cluster, eid)  # a person's stop
        waiting.join(10)
        assert answers, "the request still waits on a cold start of a stopped engine"
    finally:
        app.extensions["sagellm.gateway"].transport.close()
    resp = answers[0]
    assert resp.status_code == 503, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert error["code"] == "cold_start_failed"
    assert f"the cold start of {eid} failed: it is STOPPING" in error["message"]
    # the stop finishes on its host; the start queued for the wake starts nothing
    deliver(env.ctx, take(env, "sagellm.stop_engine", eid))
    deliver(env.ctx, take(env, "sagellm.start_engine", eid))
    rec = env.registry.get(eid)
    assert rec.state is S.STOPPED and rec.pid is None, rec
    assert env.ledger.reservation(eid) is None
    invariants(env)
