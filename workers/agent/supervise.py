"""Supervision of this host's engines: readiness of a start, the health loop, death and
restart with backoff, a LOST engine's return, and restarts a person asks for.

Starting, failing and stopping an engine are ``workers.agent.lifecycle``'s; what each
write may change is the record's own rule (``EngineRecord.mark_running``,
``pend_restart``, ...). The same guarantees hold as there: every step re-reads the
record under ``ctx.engine_lock`` and writes with one compare-and-set.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from app.core.errors import IllegalTransition, NotFoundError, ReservationConflict
from app.core.health import Verdict
from app.core.models import EngineRecord, EngineState
from workers.agent.context import HostContext
from workers.agent.lifecycle import (
    fail_final,
    kill_process,
    note,
    process_alive,
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


# ----------------------------------------------------------------------------- death


def handle_dead(ctx: HostContext, rec: EngineRecord, reason: str) -> EngineRecord | None:
    """The engine's leader process is gone: sweep what is left of its tree, then
    schedule a restart with backoff, or fail for good.

    The restart budget is given back to an engine that had been RUNNING for
    ``SAGELLM_RESTART_RESET_AFTER_S`` (a crash after weeks of service is not the third
    of a crash loop)."""
    if rec.pid is not None:
        processes.sweep_session(rec.pid, rec.process_create_time, ctx.settings.stop_grace_s)
    code = processes.exit_code(rec.pid) if rec.pid is not None else None
    tail = _tail(rec)
    error = reason + (f" (exit code {code})" if code is not None else "")
    if tail:
        error += f"; last log lines:\n{tail}"
    now = time.time()
    stable = (
        rec.running_since is not None
        and now - rec.running_since >= ctx.settings.restart_reset_after_s
    )
    restarts = 0 if stable else rec.restart_count
    if not ctx.policy.can_restart(restarts):
        return fail_final(
            ctx, rec.id, error + f"; gave up after {restarts} restart(s)", pid=rec.pid
        )
    delay = ctx.policy.restart_delay(restarts)
    try:
        updated = ctx.registry.update(
            rec.id,
            lambda r: r.pend_restart(
                error, pid=rec.pid, exit_code=code, restart_count=restarts, at=time.time() + delay
            ),
        )
    except (NotFoundError, IllegalTransition):
        return None  # handled elsewhere
    log.warning("engine %s died (%s); restart in %.1fs", rec.id, reason, delay)
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
            spawn_engine(ctx, rec.id)  # its start task was lost or expired
    elif s is S.STARTING:
        check_start(ctx, rec.id)
    elif s in (S.FAILED, S.UNHEALTHY) and rec.restart_pending:
        if rec.restart_due(now):
            spawn_engine(ctx, rec.id)
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
