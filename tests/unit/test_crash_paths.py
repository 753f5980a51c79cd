"""What ``workers.agent.supervise.handle_dead`` writes for a dead engine, step by step
on fakeredis (no process, no Celery): a cold start that died goes back to STANDBY
until the restart budget is spent, then FAILED for good; a reason a restart cannot fix
is FAILED at once. Each outcome carries the ``crashed`` event in the same write."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis

from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.settings import Settings
from app.state.ledger import Ledger
from app.state.registry import Registry
from app.state.task_stats import TaskStats
from workers.agent.context import HostContext, health_policy
from workers.agent.supervise import handle_dead
from workers.host.manifests import Manifests

S = EngineState


@pytest.fixture
def ctx(fake_redis: redis.Redis, tmp_path: Path) -> HostContext:
    settings = Settings.from_env({"SAGELLM_DATA_DIR": str(tmp_path), "SAGELLM_MAX_RESTARTS": "2"})
    return HostContext(
        settings=settings,
        registry=Registry(fake_redis),
        ledger=Ledger(fake_redis),
        manifests=Manifests(tmp_path / "engines"),
        http=httpx.Client(trust_env=False),
        celery=None,  # type: ignore[arg-type]  # none of these paths queues a task
        policy=health_policy(settings),
        task_stats=TaskStats(fake_redis),
    )


def _cold_start(ctx: HostContext, restart_count: int) -> EngineRecord:
    rec = EngineRecord(
        id="eng-cold",
        spec=EngineSpec(model="org/m", on_demand=True),
        state=S.STARTING,
        host=ctx.settings.host_name,
    )
    rec.cold_start_at = time.time()
    rec.restart_count = restart_count
    return ctx.registry.create(rec)


def _kinds(ctx: HostContext, engine_id: str) -> list[str]:
    return [e["kind"] for e in ctx.registry.events.list(engine_id)]


def test_a_cold_start_that_died_goes_back_to_standby_counting_the_failure(
    ctx: HostContext,
) -> None:
    rec = _cold_start(ctx, restart_count=0)
    handle_dead(ctx, rec, "engine process exited", exit_code=3)
    back = ctx.registry.get(rec.id)
    assert back.state is S.STANDBY and back.restart_count == 1
    assert "engine process exited (exit code 3)" in (back.last_error or "")
    assert _kinds(ctx, rec.id)[-2:] == ["state", "crashed"]


def test_a_cold_start_that_died_once_too_often_is_failed_for_good(ctx: HostContext) -> None:
    rec = _cold_start(ctx, restart_count=2)
    handle_dead(ctx, rec, "engine process exited", exit_code=3)
    failed = ctx.registry.get(rec.id)
    assert failed.state is S.FAILED and failed.next_restart_at is None
    assert failed.last_error == (
        "engine process exited (exit code 3); unknown: exit code 3"
        "; gave up after 2 failed cold start(s)"
    )
    assert failed.failure is not None and failed.failure["reason"] == "unknown"
    assert _kinds(ctx, rec.id)[-3:] == ["state", "crashed", "failed"]
    assert ctx.ledger.is_empty()


def test_a_reason_a_restart_cannot_fix_is_failed_at_once(ctx: HostContext) -> None:
    rec = _cold_start(ctx, restart_count=0)
    handle_dead(ctx, rec, "engine process exited", exit_code=127)
    failed = ctx.registry.get(rec.id)
    assert failed.state is S.FAILED and failed.restart_count == 0
    assert "; not restarted (missing_runtime): " in (failed.last_error or "")
    assert failed.failure is not None and failed.failure["reason"] == "missing_runtime"
    assert _kinds(ctx, rec.id)[-3:] == ["state", "crashed", "failed"]
