"""Supervision of this host's engines: readiness of a start, the health loop, death and
restart with backoff, a LOST engine's return, and restarts a person asks for.

Starting, failing and stopping an engine are ``workers.agent.lifecycle``'s; what each
write may change is the record's own rule (``EngineRecord.mark_running``,
``pend_restart``, ...). The same guarantees hold as there: every step re-reads the
record under ``ctx.engine_lock`` and writes with one compare-and-set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

from app.core.errors import IllegalTransition, NotFoundError, ReservationConflict
from app.core.failures import Failure, Reason, classify
from app.core.health import Verdict
from app.core.models import EngineRecord, EngineState
from app.state.events import encode_event
from app.state.on_demand_counters import OnDemandCounters
from workers.agent import remedy
from workers.agent.context import HostContext
from workers.agent.lifecycle import (
    fail_final,
    kill_process,
    note,
    process_alive,
    record_failure,
    room_of,
    spawn_engine,
    stop_engine,
)
from workers.host import processes
from workers.runtimes import get_runtime

log = logging.getLogger(__name__)
S = EngineState
PENDING_GRACE_S = 30.0  # a PENDING engine whose start task never ran is started by the loop


def _tail(rec: EngineRecord, lines: int = 20) -> str:
    if not rec.log_path:
        return ""
    try:
        return processes.tail_log(Path(rec.log_path), lines)
    except OSError:
        return ""


# ----------------------------------------------------------------------------- readiness


def check_start(ctx: HostContext, engine_id: str) -> str:
    """One readiness check of a STARTING engine: ``running``, ``waiting``, ``failed``
    or the engine's state when it is not STARTING."""
    with ctx.engine_lock(engine_id, blocking=False) as free:
        if not free:
            return "waiting"  # a stop or restart of it runs now
        return _check_start_locked(ctx, engine_id)


def _check_start_locked(ctx: HostContext, engine_id: str) -> str:
    rec = ctx.registry.find(engine_id)
    if rec is None:
        return "gone"
    if rec.state is not S.STARTING:
        return rec.state.value.lower()
    if not process_alive(rec):
        processes.reap_children()
        handle_dead(ctx, rec, "engine process exited before it was ready")
        return "failed"
    ready = get_runtime(rec.spec.effective_runtime).probe(
        rec, ctx.http, ctx.settings.health_timeout_s
    )
    if ready.ready:
        pid = rec.pid
        try:
            rec = ctx.registry.update(engine_id, lambda r: r.mark_running(pid))
        except (IllegalTransition, NotFoundError):
            return "changed"
        if rec.cold_start_s is not None and rec.cold_start_at is None:
            OnDemandCounters(ctx.registry.r).observe_cold_start(rec.cold_start_s)
        ctx.manifests.write(rec)
        log.info("engine %s is RUNNING at %s", engine_id, rec.base_url)
        return "running"
    if rec.start_deadline is not None and time.time() > rec.start_deadline:
        assert rec.pid is not None
        kill_process(ctx, rec.pid, rec.process_create_time, engine_id)
        handle_dead(
            ctx,
            rec,
            f"not ready within {ctx.settings.start_timeout_s:g}s ({ready.detail})",
        )
        return "failed"
    return "waiting"


def on_exit(ctx: HostContext, engine_id: str, pid: int) -> str:
    """The exit watch saw process ``pid`` of an engine exit: take the dead-engine path
    now (``handle_dead``; a STARTING engine through its readiness check) rather than at
    the next health tick. Waits for an operation on the engine that runs now (a stop
    that killed it, a restart), then acts on the record as it is: nothing when it no
    longer runs ``pid``. Returns what it did."""
    processes.reap_children()  # our child: its exit code, for handle_dead
    with ctx.engine_lock(engine_id):
        rec = ctx.registry.find(engine_id)
        if rec is None or rec.host != ctx.host or rec.pid != pid:
            return "not its process"
        if process_alive(rec):
            return "alive"
        if rec.state is S.STARTING:
            return _check_start_locked(ctx, engine_id)
        if rec.state in (S.RUNNING, S.UNHEALTHY):
            handle_dead(ctx, rec, "engine process exited")
            return "dead"
        return rec.state.value.lower()


# ----------------------------------------------------------------------------- death


def handle_dead(
    ctx: HostContext,
    rec: EngineRecord,
    reason: str,
    *,
    cause: Reason | None = None,
    exit_code: int | None = None,
) -> EngineRecord | None:
    """The engine's leader process is gone: sweep what is left of its tree, classify
    why it died (``app.core.failures``: the record's ``failure`` and a ``crashed``
    event), then act on the reason:

    * one a restart cannot fix (``model_not_found``, ``missing_runtime``): FAILED for
      good at once, its room released;
    * a memory reason at start: ``workers.agent.remedy`` (a shorter max length,
      another GPU, bounded), or FAILED saying why;
    * anything else: a restart with backoff, or FAILED when the budget is spent.

    ``cause``: we ended it ourselves (``Reason.START_TIMEOUT``, ``Reason.UNRESPONSIVE``;
    inferred from ``reason`` when not given). ``exit_code``: when the caller reaped it.

    The restart budget is given back to an engine that had been RUNNING for
    ``SAGELLM_RESTART_RESET_AFTER_S`` (a crash after weeks of service is not the third
    of a crash loop)."""
    if rec.pid is not None:
        processes.sweep_session(rec.pid, rec.process_create_time, ctx.settings.stop_grace_s)
    code = exit_code
    if code is None and rec.pid is not None:
        code = processes.exit_code(rec.pid)
    tail = _tail(rec)
    failure = dataclasses.replace(
        classify(code, _tail(rec, CLASSIFY_LINES), cause=cause or _our_cause(reason)),
        at=time.time(),
    )
    error = reason + (f" (exit code {code})" if code is not None else "")
    error += f"; {failure.summary()}"
    if tail:
        error += f"; last log lines:\n{tail}"
    # The timeline's "crashed" event is written by the same atomic step as what is
    # decided (restart pending, or FAILED), never as a write of its own.
    crashed = encode_event(
        "crashed",
        f"{reason}: {failure.summary()}",
        reason=failure.reason,
        exit_code=code,
        signal=failure.signal,
    )
    if not failure.restartable:
        message = f"{error}; not restarted ({failure.reason}): {failure.advice}"
        return _fail_after_crash(ctx, rec, message, failure, crashed)
    if remedy.applies(ctx, rec, failure):
        with contextlib.suppress(Exception):  # the timeline must not stop crash handling
            ctx.registry.events.add_encoded(rec.id, crashed)
        return remedy.remediate(ctx, rec, failure, error)
    if rec.spec.on_demand and rec.cold_start_at is not None and rec.state is S.STARTING:
        return _cold_start_failed(ctx, rec, failure, error, crashed)
    now = time.time()
    stable = (
        rec.running_since is not None
        and now - rec.running_since >= ctx.settings.restart_reset_after_s
    )
    restarts = 0 if stable else rec.restart_count
    if not ctx.policy.can_restart(restarts):
        message = f"{error}; gave up after {restarts} restart(s)"
        return _fail_after_crash(ctx, rec, message, failure, crashed)
    delay = ctx.policy.restart_delay(restarts)

    def pend(r: EngineRecord) -> None:
        r.pend_restart(
            error, pid=rec.pid, exit_code=code, restart_count=restarts, at=time.time() + delay
        )
        record_failure(r, failure)

    try:
        updated = ctx.registry.update(rec.id, pend, events=[crashed])
    except (NotFoundError, IllegalTransition):
        return None  # handled elsewhere
    log.warning("engine %s died (%s, %s); restart in %.1fs", rec.id, reason, failure.reason, delay)
    from app.state.queues import send_to_host

    send_to_host(
        ctx.celery,
        ctx.host,
        "sagellm.restart_engine",
        (rec.id,),
        expires_s=60 + delay,
        countdown_s=delay,
    )
    return updated


def _cold_start_failed(
    ctx: HostContext, rec: EngineRecord, failure: Failure, error: str, crashed: str
) -> EngineRecord | None:
    """An on-demand engine died during its cold start: back to STANDBY with the reason
    (the requests waiting for it answer 503 with it), or FAILED once the restart budget
    is spent."""
    if not ctx.policy.can_restart(rec.restart_count):
        message = f"{error}; gave up after {rec.restart_count} failed cold start(s)"
        return _fail_after_crash(ctx, rec, message, failure, crashed)

    def apply(r: EngineRecord) -> None:
        r.cold_start_failed(error, pid=rec.pid, restart_count=rec.restart_count + 1)
        record_failure(r, failure)

    try:
        updated = ctx.registry.update(rec.id, apply, events=[crashed])
    except (NotFoundError, IllegalTransition):
        return None
    ctx.manifests.remove(rec.id)
    log.warning("engine %s: cold start failed (%s); back to STANDBY", rec.id, failure.reason)
    return updated


def _fail_after_crash(
    ctx: HostContext, rec: EngineRecord, message: str, failure: Failure, crashed: str
) -> EngineRecord | None:
    """FAILED for good after its process died: the ``crashed`` event and the reason
    written in the same step (``fail_final``)."""
    return fail_final(ctx, rec.id, message, pid=rec.pid, failure=failure, events=[crashed])


# Log lines read to classify a death: vLLM's root cause can sit a long traceback above
# the last line (its engine core logs it, then the API server fails in turn).
CLASSIFY_LINES = 200
# What our own callers say when they killed the engine (when they pass no ``cause``).
_OUR_KILLS = (("not ready within", Reason.START_TIMEOUT), ("unhealthy for", Reason.UNRESPONSIVE))


def _our_cause(reason: str) -> Reason | None:
    return next((cause for prefix, cause in _OUR_KILLS if reason.startswith(prefix)), None)


# ----------------------------------------------------------------------------- health


def probe_health(ctx: HostContext, rec: EngineRecord) -> tuple[bool, str]:
    """GET /health with the configured timeout."""
    try:
        resp = ctx.http.get(f"{rec.base_url}/health", timeout=ctx.settings.health_timeout_s)
    except Exception as exc:
        return False, f"/health: {type(exc).__name__}"
    return resp.status_code == 200, f"/health answered {resp.status_code}"


def check_engine(ctx: HostContext, rec: EngineRecord, now: float) -> None:
    """One health-loop step for one engine of this host."""
    s = rec.state
    if s is S.PENDING:
        if now - rec.created_at > PENDING_GRACE_S:
            ctx.track(spawn_engine(ctx, rec.id))  # its start task was lost or expired
    elif s is S.STARTING:
        check_start(ctx, rec.id)
    elif s in (S.FAILED, S.UNHEALTHY) and rec.restart_pending:
        if rec.restart_due(now):
            ctx.track(spawn_engine(ctx, rec.id))
    elif s in (S.RUNNING, S.UNHEALTHY):
        if not process_alive(rec):
            handle_dead(ctx, rec, "engine process exited")
            return
        ok, detail = probe_health(ctx, rec)
        verdict, failures = ctx.policy.judge(s, ok, rec.health_failures)
        if verdict is Verdict.RESTART:
            assert rec.pid is not None
            kill_process(ctx, rec.pid, rec.process_create_time, rec.id)
            handle_dead(ctx, rec, f"unhealthy for {failures} checks in a row ({detail})")
            return
        _record_health(ctx, rec, verdict, failures, detail)
    elif s is S.DRAINING:
        # Its stop task was lost or its worker restarted: resume the drain watch (or stop
        # it now, if the deadline passed).
        stop_engine(ctx, rec.id)
    elif s is S.STOPPING:
        # No stop is running in this worker (check_host holds the engine's lock), so
        # the stop task was lost, expired while the host was down, or its worker died:
        # finish the stop now. A stop is never forgotten.
        stop_engine(ctx, rec.id)
    elif s is S.LOST:
        reconcile_lost(ctx, rec)


def _record_health(
    ctx: HostContext, rec: EngineRecord, verdict: Verdict, failures: int, detail: str
) -> None:
    def apply(r: EngineRecord) -> None:
        if verdict is Verdict.HEALTHY:
            r.mark_healthy(rec.pid)
        else:
            unhealthy = f"{failures} failed health checks ({detail})"
            r.count_failed_checks(
                rec.pid, failures, unhealthy=unhealthy if verdict is Verdict.UNHEALTHY else None
            )

    with contextlib.suppress(NotFoundError, IllegalTransition):
        ctx.registry.update(rec.id, apply)


def check_host(ctx: HostContext) -> dict[str, int]:
    """The health loop for every engine of this host; returns counts by state."""
    processes.reap_children()
    now = time.time()
    counts: dict[str, int] = {}
    for rec in ctx.registry.engines(host=ctx.host):
        counts[rec.state.value] = counts.get(rec.state.value, 0) + 1
        with ctx.engine_lock(rec.id, blocking=False) as free:
            if not free:
                continue  # a start, stop or restart of it runs now; next tick
            try:
                current = ctx.registry.find(rec.id)  # as it is now that we hold it
                if current is not None:
                    ctx.track(current)  # one the watch missed is watched from now on
                    check_engine(ctx, current, now)
            except Exception:
                log.exception("health check of %s failed", rec.id)
    return counts


# ----------------------------------------------------------------------------- return


def reconcile_lost(ctx: HostContext, rec: EngineRecord) -> None:
    """Our host is back: a LOST engine is RUNNING again if its process lives, else it died."""
    if not process_alive(rec):
        handle_dead(ctx, rec, "engine process gone while its host was down")
        return
    reserved = ensure_reserved(ctx, rec)
    ok, detail = probe_health(ctx, rec)
    with contextlib.suppress(NotFoundError, IllegalTransition):
        ctx.registry.update(
            rec.id, lambda r: r.return_from_lost(answers=ok, reserved=reserved, detail=detail)
        )


def ensure_reserved(ctx: HostContext, rec: EngineRecord) -> bool:
    """Re-take the reservation of a live engine if the ledger lost it (a lost Redis),
    in the same write as its record. When someone else took the room meanwhile, the
    engine is UNHEALTHY with ``reservation_error`` saying why (not routed to), and
    rediscovery tries again. True when the engine holds its reservation."""
    if rec.port is None or rec.host is None or rec.owns_nothing:
        return False
    if rec.evicted_for is not None:
        return True  # it handed its room to another engine on purpose and is stopping
    req = room_of(ctx, rec, reclaim=True)
    try:
        ctx.registry.update(rec.id, EngineRecord.mark_reserved, reserve=req)
        return True
    except NotFoundError:
        return False
    except ReservationConflict as exc:
        message = f"running without its reservation: {exc.message}"
        if rec.reservation_error != message:
            note(ctx, rec.id, message)
        with contextlib.suppress(NotFoundError, IllegalTransition):
            ctx.registry.update(rec.id, lambda r: r.mark_unreserved(message))
        return False


# ----------------------------------------------------------------------------- restart


def manual_restart(ctx: HostContext, engine_id: str) -> EngineRecord | None:
    """A restart a person asked for: stop the process, start it again at once.

    It does not count against ``SAGELLM_MAX_RESTARTS`` (that budget is for crashes).
    The reservation is held throughout (a restart-pending engine owns its room).
    """
    with ctx.engine_lock(engine_id):
        rec = ctx.registry.find(engine_id)
        if rec is None or rec.host != ctx.host:
            return None
        if rec.pid is not None:
            kill_process(ctx, rec.pid, rec.process_create_time, engine_id)
        try:
            ctx.registry.update(engine_id, EngineRecord.request_restart)
        except (NotFoundError, IllegalTransition):
            return ctx.registry.find(engine_id)
        return spawn_engine(ctx, engine_id, count_restart=False)
