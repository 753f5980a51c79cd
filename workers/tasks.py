"""Celery tasks: thin, idempotent entry points that call ordinary functions.

Host tasks run on ``host.<name>`` and act only when the message is for this host.
Control tasks (beat's fan-outs, pruning) run on the ``control`` queue, on any worker.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from app.core.models import EngineRecord, EngineState
from app.state.client import connect
from app.state.ledger import Ledger
from app.state.queues import send_to_host
from app.state.registry import Registry
from workers.agent import lifecycle
from workers.agent.context import HostContext, host_context
from workers.agent.reconcile import rediscover
from workers.celery_app import celery_app, settings

log = logging.getLogger(__name__)
S = EngineState
WATCH_INTERVAL_S = 1.0


def _watch(ctx: HostContext, engine_id: str) -> None:
    """Poll readiness again in WATCH_INTERVAL_S (a short task, never a long wait)."""
    send_to_host(
        ctx.celery,
        ctx.host,
        "sagellm.watch_start",
        (engine_id,),
        expires_s=30,
        countdown_s=WATCH_INTERVAL_S,
    )


def _watch_if_starting(ctx: HostContext, rec: EngineRecord | None) -> None:
    if rec is not None and rec.state is S.STARTING:
        _watch(ctx, rec.id)


@celery_app.task(name="sagellm.start_engine")
def start_engine(engine_id: str) -> dict[str, Any]:
    """Spawn the engine and start watching its readiness."""
    ctx = host_context()
    rec = lifecycle.spawn_engine(ctx, engine_id)
    _watch_if_starting(ctx, rec)
    return {"engine_id": engine_id, "state": rec.state.value if rec else None}


@celery_app.task(name="sagellm.watch_start")
def watch_start(engine_id: str) -> str:
    """One readiness poll; re-schedules itself while the engine is still starting."""
    ctx = host_context()
    status = lifecycle.check_start(ctx, engine_id)
    if status == "waiting":
        _watch(ctx, engine_id)
    return status


@celery_app.task(name="sagellm.restart_engine")
def restart_engine(engine_id: str) -> dict[str, Any]:
    """A due automatic restart (scheduled with the backoff delay)."""
    ctx = host_context()
    rec = ctx.registry.find(engine_id)
    if rec is None or rec.next_restart_at is None or time.time() < rec.next_restart_at - 0.05:
        return {"engine_id": engine_id, "restarted": False}
    rec = lifecycle.spawn_engine(ctx, engine_id)
    _watch_if_starting(ctx, rec)
    return {"engine_id": engine_id, "restarted": rec is not None}


@celery_app.task(name="sagellm.stop_engine")
def stop_engine(engine_id: str) -> dict[str, Any]:
    rec = lifecycle.stop_engine(host_context(), engine_id)
    return {"engine_id": engine_id, "state": rec.state.value if rec else None}


@celery_app.task(name="sagellm.restart_engine_now")
def restart_engine_now(engine_id: str) -> dict[str, Any]:
    """A restart a person asked for (API/CLI)."""
    ctx = host_context()
    rec = lifecycle.manual_restart(ctx, engine_id)
    _watch_if_starting(ctx, rec)
    return {"engine_id": engine_id, "state": rec.state.value if rec else None}


@celery_app.task(name="sagellm.read_log")
def read_log(engine_id: str, tail: int) -> list[str]:
    return lifecycle.read_log(host_context(), engine_id, tail)


@celery_app.task(name="sagellm.check_host")
def check_host(host: str) -> dict[str, int]:
    ctx = host_context()
    if host != ctx.host:
        return {}
    return lifecycle.check_host(ctx)


@celery_app.task(name="sagellm.rediscover")
def rediscover_host(host: str) -> dict[str, list[str]]:
    ctx = host_context()
    if host != ctx.host:
        return {}
    return rediscover(ctx).to_dict()


def _state() -> tuple[Registry, Ledger]:
    client = connect(settings.redis_url)
    return Registry(client), Ledger(client)


@celery_app.task(name="sagellm.tick_health")
def tick_health() -> list[str]:
    """Beat: health-check every live host, one task per host queue. (Engines of DOWN
    hosts are marked LOST by beat itself: see ``workers.beat_scheduler``.)"""
    registry, _ = _state()
    hosts = [h.name for h in registry.hosts() if h.up]
    for name in hosts:
        send_to_host(
            celery_app, name, "sagellm.check_host", (name,), expires_s=settings.health_interval_s
        )
    return hosts


@celery_app.task(name="sagellm.tick_rediscovery")
def tick_rediscovery() -> list[str]:
    registry, _ = _state()
    hosts = [h.name for h in registry.hosts() if h.up]
    for name in hosts:
        send_to_host(
            celery_app,
            name,
            "sagellm.rediscover",
            (name,),
            expires_s=settings.rediscovery_interval_s,
        )
    return hosts


@celery_app.task(name="sagellm.prune")
def prune(older_than_s: float | None = None) -> list[str]:
    """Delete STOPPED/FAILED records past retention; release anything they still hold."""
    from app.services.engines import prune_records

    registry, ledger = _state()
    age = settings.prune_after_s if older_than_s is None else older_than_s
    return prune_records(registry, ledger, age)
