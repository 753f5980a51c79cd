"""The drain of a DRAINING engine, watched by its host's worker in a thread.

A stop that drains (``EngineRecord.start_drain``, written by the API) takes the engine
out of the gateway's rotation at once; the requests already sent to it must finish
before it is signalled. The stop task hands the engine to ``watch`` and returns (tasks
stay short: no Celery task waits for a drain); a thread of the worker then checks every
``POLL_S`` until the drain is over and calls back the stop (``workers.agent.lifecycle``)
with the outcome:

* ``drained``: every gateway process reports that it knows of the drain
  (``GatewayReports.drain_view``: its reported ``fresh`` is at or past the write number
  of the engine's DRAINING record, ``app.state.write_seq``, so it sends the engine
  nothing new) and none has a request in flight to it, and the engine itself, when it
  says so (vLLM's ``/metrics``), has none running or waiting;
* ``timed_out``: the drain deadline passed first (the stop goes on anyway);
* ``gone``: its process exited (nothing left to drain).

The watch ends without calling back when the engine is no longer DRAINING (a stop
without drain took over, or it went LOST). A worker that dies forgets its watches: the
health loop, and a stop task delivered again, hand the engine back (``watch`` is
idempotent per engine).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.core.models import EngineRecord, EngineState
from app.state.gateway_report import GatewayReports
from app.state.write_seq import current_seq, record_seq
from workers.agent.context import HostContext
from workers.host import processes

log = logging.getLogger(__name__)
POLL_S = 0.05
# vLLM's Prometheus gauges of requests it holds (the stand-ins have no /metrics).
ENGINE_BUSY_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")


class Outcome(enum.StrEnum):
    DRAINED = "drained"
    TIMED_OUT = "timed_out"
    GONE = "gone"


@dataclass(frozen=True)
class DrainCheck:
    """One look at a drain: its outcome (None: go on) and what was still in flight."""

    outcome: Outcome | None
    in_flight: int = 0
    behind: int = 0  # gateway processes that may not know of the drain yet


Then = Callable[[HostContext, str, DrainCheck], object]


def engine_busy(ctx: HostContext, rec: EngineRecord) -> int:
    """Requests the engine itself says it holds (vLLM's /metrics); 0 when it does not
    say (no such endpoint, no answer): the gateway's count is the rule, this a check."""
    if rec.base_url is None:
        return 0
    try:
        resp = ctx.http.get(f"{rec.base_url}/metrics", timeout=ctx.settings.health_timeout_s)
    except Exception:
        return 0
    if resp.status_code != 200:
        return 0
    busy = 0.0
    for line in resp.text.splitlines():
        if line.startswith(ENGINE_BUSY_METRICS):
            try:
                busy += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return int(busy)


def drain_seq(ctx: HostContext, rec: EngineRecord) -> int:
    """The write number a gateway must have heard up to for the drain of ``rec``: its
    record's (the DRAINING write, or a later one); for a record written without a
    number, the last number Redis handed out (later than the drain: safe)."""
    r = ctx.registry.r
    seq = record_seq(r, rec.id)
    return seq if seq is not None else current_seq(r)


def check(ctx: HostContext, rec: EngineRecord, reports: GatewayReports, now: float) -> DrainCheck:
    """Whether the drain of ``rec`` (DRAINING) is over, and why."""
    if rec.pid is None or not processes.is_alive(rec.pid, rec.process_create_time):
        return DrainCheck(Outcome.GONE)
    in_flight, behind = reports.drain_view(rec.id, since=drain_seq(ctx, rec))
    if in_flight == 0 and behind == 0:
        in_flight = engine_busy(ctx, rec)
        if in_flight == 0:
            return DrainCheck(Outcome.DRAINED)
    if rec.drain_deadline is None or now >= rec.drain_deadline:
        return DrainCheck(Outcome.TIMED_OUT, in_flight, behind)
    return DrainCheck(None, in_flight, behind)


def _in_thread(run: Callable[[], None], name: str) -> None:
    threading.Thread(target=run, daemon=True, name=name).start()


_guard = threading.Lock()  # the watched sets of every context of this process


def abandon(ctx: HostContext) -> None:
    """The worker of ``ctx`` is gone (tests that replace it in-process): its watches
    end without acting, as they would have with it."""
    ctx.abandoned = True


def watch(ctx: HostContext, engine_id: str, then: Then) -> bool:
    """Watch the drain of ``engine_id`` until it is over, then call ``then(ctx,
    engine_id, check)``; False when this worker (``ctx``) watches it already. How the
    watch runs is ``ctx.drain_runner``'s (default: a daemon thread)."""
    with _guard:
        if engine_id in ctx.drain_watching:
            return False
        ctx.drain_watching.add(engine_id)
    try:
        (ctx.drain_runner or _in_thread)(lambda: _watch(ctx, engine_id, then), f"drain-{engine_id}")
    except BaseException:
        with _guard:
            ctx.drain_watching.discard(engine_id)
        raise
    return True


def _watch(ctx: HostContext, engine_id: str, then: Then) -> None:
    reports = GatewayReports(ctx.registry.r)
    try:
        while not ctx.abandoned:
            try:
                rec = ctx.registry.find(engine_id)
                if rec is None or rec.state is not EngineState.DRAINING:
                    return  # stopped without drain, gone, or LOST: not ours to finish
                result = check(ctx, rec, reports, time.time())
            except Exception:  # Redis away for a moment: look again
                log.exception("drain of engine %s: check failed", engine_id)
                time.sleep(1.0)
                continue
            if result.outcome is not None:
                then(ctx, engine_id, result)
                return
            time.sleep(POLL_S)
    except Exception:
        log.exception("drain of engine %s failed; the health loop takes it up", engine_id)
    finally:
        with _guard:
            ctx.drain_watching.discard(engine_id)
