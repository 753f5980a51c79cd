"""Idle stops: an engine with ``idle_timeout_s`` that got no gateway request for that
long is drained and stopped, back to STANDBY when it is on demand (STOPPED otherwise),
its room released. A thread of the host's worker (``IdleThread``) checks this host's
RUNNING engines every ``SAGELLM_IDLE_CHECK_S``.

When an engine last got a request comes from the gateway processes' reports
(``app.state.gateway_report``, one read per check): how many seconds ago each process
last routed a request to each engine, and its requests in flight: an engine with a
request in flight is busy now, however long the request has run. Ages are added to
this worker's own clock, so clocks that disagree across machines move nothing. The
countdown is written into the record (``last_request_at``, ``idle_stops_at``) when it
moves, not on every check.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from app.core.errors import IllegalTransition, NotFoundError
from app.core.models import EngineRecord, EngineState
from app.state.events import encode_event
from app.state.gateway_report import GatewayReports
from app.state.on_demand_counters import OnDemandCounters
from workers.agent.context import HostContext

log = logging.getLogger(__name__)
# A countdown that moved less than this is not written again.
WRITE_SLACK_S = 0.5


def check_idle(ctx: HostContext, now: float | None = None) -> list[str]:
    """One pass over this host's RUNNING engines with an idle timeout; returns the ids
    of those it began to stop."""
    now = time.time() if now is None else now
    engines = [
        r
        for r in ctx.registry.engines(host=ctx.host, state=EngineState.RUNNING)
        if r.spec.idle_timeout_s is not None
    ]
    if not engines:
        return []
    ages, busy = GatewayReports(ctx.registry.r).idle_view(r.id for r in engines)
    stopped = []
    for rec in engines:
        assert rec.spec.idle_timeout_s is not None
        last = max(
            rec.last_request_at or 0.0,
            rec.running_since or rec.created_at,
            now - ages[rec.id] if rec.id in ages else 0.0,
            now if rec.id in busy else 0.0,
        )
        stops_at = last + rec.spec.idle_timeout_s
        if now >= stops_at and rec.id not in busy:
            if _idle_stop(ctx, rec, now):
                stopped.append(rec.id)
        elif (
            abs((rec.idle_stops_at or 0.0) - stops_at) >= WRITE_SLACK_S
            or abs((rec.last_request_at or 0.0) - last) >= WRITE_SLACK_S
        ):
            _write_countdown(ctx, rec.id, last, stops_at)
    return stopped


def _write_countdown(ctx: HostContext, engine_id: str, last: float, stops_at: float) -> None:
    def apply(r: EngineRecord) -> None:
        if r.state is not EngineState.RUNNING:
            raise IllegalTransition(f"engine {engine_id} is {r.state.value}")
        r.last_request_at, r.idle_stops_at = last, stops_at

    with contextlib.suppress(NotFoundError, IllegalTransition):
        ctx.registry.update(engine_id, apply)


def _idle_stop(ctx: HostContext, rec: EngineRecord, now: float) -> bool:
    from workers.agent.lifecycle import stop_engine

    timeout = rec.spec.idle_timeout_s or 0.0
    deadline = now + ctx.settings.drain_timeout_s
    where = "STANDBY" if rec.spec.on_demand else "STOPPED"
    event = encode_event(
        "idle_stop",
        f"no request for {timeout:g}s: draining, then {where}; its room is released",
        idle_timeout_s=timeout,
    )
    try:
        ctx.registry.update(rec.id, lambda r: r.idle_stop(deadline), events=[event])
    except (NotFoundError, IllegalTransition):
        return False
    OnDemandCounters(ctx.registry.r).add(OnDemandCounters.IDLE_STOPS)
    log.info("engine %s idle for %.0fs: stopping to %s", rec.id, timeout, where)
    stop_engine(ctx, rec.id)  # hands it to the drain watch (returns at once)
    return True


class IdleThread(threading.Thread):
    """Runs ``check_idle`` every ``SAGELLM_IDLE_CHECK_S``; survives Redis outages."""

    def __init__(self, ctx: HostContext) -> None:
        super().__init__(name="sagellm-idle", daemon=True)
        self.ctx = ctx
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.ctx.settings.idle_check_s):
            try:
                check_idle(self.ctx)
            except Exception:
                log.exception("idle check failed")

    def stop(self) -> None:
        self.stopped.set()
