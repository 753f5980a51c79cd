"""Celery tasks: thin, idempotent entry points that call ordinary functions.

Host tasks run on ``host.<name>`` and act only when the message is for this host.
Control tasks (beat's fan-outs, pruning, the probe of external engines) run on the
``control`` queue, on any worker.
Tasks are shared (registered on the process's app, ``workers.celery_app.worker_app``,
when it is finalised) and named by string; senders use the names, never this module.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import shared_task

from app.core.models import EngineRecord, EngineState
from app.state.queues import send_to_host
from workers.agent import external_probe, lifecycle, supervise
from workers.agent.context import HostContext, host_context
from workers.agent.reconcile import rediscover

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
    """Watch a just-spawned engine: the worker's engine watch probes its readiness and
    its exit in this process (``workers.agent.watch``); without one (it has not
    started yet), the ``sagellm.watch_start`` task polls readiness."""
    if ctx.track(rec):
        return
    if rec is not None and rec.state is S.STARTING:
        _watch(ctx, rec.id)


@shared_task(name="sagellm.start_engine")
def start_engine(engine_id: str) -> dict[str, Any]:
    """Spawn the engine and start watching its readiness."""
    ctx = host_context()
    rec = lifecycle.spawn_engine(ctx, engine_id)
    _watch_if_starting(ctx, rec)
    return {"engine_id": engine_id, "state": rec.state.value if rec else None}


@shared_task(name="sagellm.watch_start")
def watch_start(engine_id: str) -> str:
    """The fallback readiness poll: hands the engine to the worker's engine watch when
    there is one (a poll sent before a worker restart lands here); else one poll that
    re-schedules itself while the engine is still starting."""
    ctx = host_context()
    if ctx.watch is not None:
        rec = ctx.registry.find(engine_id)
        ctx.track(rec)
        return "watched" if rec is not None and rec.state is S.STARTING else "not starting"
    status = supervise.check_start(ctx, engine_id)
    if status == "waiting":
        _watch(ctx, engine_id)
    return status


@shared_task(name="sagellm.restart_engine")
def restart_engine(engine_id: str) -> dict[str, Any]:
    """A due automatic restart (scheduled with the backoff delay)."""
    ctx = host_context()
    rec = ctx.registry.find(engine_id)
    if rec is None or not rec.restart_due(time.time() + 0.05):
        return {"engine_id": engine_id, "restarted": False}
    rec = lifecycle.spawn_engine(ctx, engine_id)
    _watch_if_starting(ctx, rec)
    return {"engine_id": engine_id, "restarted": rec is not None}


@shared_task(name="sagellm.stop_engine")
def stop_engine(engine_id: str) -> dict[str, Any]:
    rec = lifecycle.stop_engine(host_context(), engine_id)
    return {"engine_id": engine_id, "state": rec.state.value if rec else None}


@shared_task(name="sagellm.restart_engine_now")
def restart_engine_now(engine_id: str) -> dict[str, Any]:
    """A restart a person asked for (API/CLI)."""
    ctx = host_context()
    rec = supervise.manual_restart(ctx, engine_id)
    _watch_if_starting(ctx, rec)
    return {"engine_id": engine_id, "state": rec.state.value if rec else None}


@shared_task(name="sagellm.read_log")
def read_log(engine_id: str, tail: int) -> list[str]:
    return lifecycle.read_log(host_context(), engine_id, tail)


@shared_task(name="sagellm.check_host")
def check_host(host: str) -> dict[str, int]:
    ctx = host_context()
    if host != ctx.host:
        return {}
    return supervise.check_host(ctx)


@shared_task(name="sagellm.rediscover")
def rediscover_host(host: str) -> dict[str, list[str]]:
    ctx = host_context()
    if host != ctx.host:
        return {}
    report = rediscover(ctx).to_dict()
    if ctx.watch is not None and (report["adopted"] or report["relinked"]):
        ctx.watch.sync()
    return report


def _fan_out(task: str, every_s: float) -> list[str]:
    """Send ``task`` to every live host's queue (beat's fan-outs); the hosts."""
    ctx = host_context()
    hosts = [h.name for h in ctx.registry.hosts() if h.up]
    for name in hosts:
        send_to_host(ctx.celery, name, task, (name,), expires_s=every_s)
    return hosts


@shared_task(name="sagellm.tick_health")
def tick_health() -> list[str]:
    """Beat: health-check every live host, one task per host queue. (Engines of DOWN
    hosts are marked LOST by beat itself: see ``workers.beat_scheduler``.)"""
    return _fan_out("sagellm.check_host", host_context().settings.health_interval_s)


@shared_task(name="sagellm.tick_rediscovery")
def tick_rediscovery() -> list[str]:
    return _fan_out("sagellm.rediscover", host_context().settings.rediscovery_interval_s)


@shared_task(name="sagellm.probe_external")
def probe_external(engine_id: str | None = None) -> dict[str, str]:
    """Probe the external engines (beat, every health interval), or the one just
    registered: RUNNING or UNHEALTHY (``workers.agent.external_probe``)."""
    ctx = host_context()
    return external_probe.probe_external_engines(
        ctx.registry,
        external_probe.client(),
        ctx.policy,
        timeout_s=ctx.settings.health_timeout_s,
        engine_id=engine_id,
    )


@shared_task(name="sagellm.prune")
def prune(older_than_s: float | None = None) -> list[str]:
    """Delete STOPPED/FAILED records past retention; release anything they still hold."""
    from app.state.prune import prune_records

    ctx = host_context()
    age = ctx.settings.prune_after_s if older_than_s is None else older_than_s
    return prune_records(ctx.registry, ctx.ledger, age)
