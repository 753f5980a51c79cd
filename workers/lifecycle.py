"""Engine lifecycle on this host: spawn, watch readiness, health, restart, stop.

Each function re-reads the record and acts on its *current* state, so a task that is
delivered twice, or two paths racing (health loop vs. readiness watch vs. stop), do
no harm: state changes go through the registry's atomic update and the state
machine, and the ledger's release happens exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from app.core.errors import IllegalTransition, NotFoundError, ReservationConflict, SagellmError
from app.core.health import Verdict, pending_restart_state
from app.core.models import EngineRecord, EngineState
from app.core.state.ledger import port_is_bindable
from workers import processes
from workers.context import ENGINE_HOST_ENV, HostContext
from workers.runtimes import get_runtime
from workers.runtimes.base import LaunchPlan

log = logging.getLogger(__name__)
S = EngineState
PENDING_GRACE_S = 30.0  # a PENDING engine whose start task never ran is started by the loop
_RESTARTABLE = (S.PENDING, S.FAILED, S.UNHEALTHY, S.LOST)


class _Abort(Exception):
    """Raised inside a record update to leave the record unchanged."""


def _tail(rec: EngineRecord, lines: int = 20) -> str:
    if not rec.log_path:
        return ""
    try:
        return processes.tail_log(Path(rec.log_path), lines)
    except OSError:
        return ""


def kill_process(
    ctx: HostContext, pid: int, create_time: float | None, engine_id: str
) -> processes.StopResult | None:
    """Stop an engine's process group (SIGTERM, grace, SIGKILL). A pid that turns out
    not to carry this engine's tag is never signalled: logged and left alone."""
    try:
        return processes.stop(pid, create_time, ctx.settings.stop_grace_s, engine_id=engine_id)
    except processes.NotOurProcess as exc:
        log.error("engine %s: not stopping pid %s: %s", engine_id, pid, exc)
        return None


def _alive(rec: EngineRecord) -> bool:
    return rec.pid is not None and processes.is_alive(rec.pid, rec.process_create_time)


# ----------------------------------------------------------------------------- spawn


def spawn_engine(
    ctx: HostContext, engine_id: str, *, count_restart: bool = True
) -> EngineRecord | None:
    """Start the engine's process (first start or a due restart) and mark it STARTING.

    Returns the record, or None when the engine is not (or no longer) ours to start.
    """
    rec = ctx.registry.find(engine_id)
    if rec is None or rec.host != ctx.host:
        return None
    if rec.state not in _RESTARTABLE or _alive(rec):
        return rec  # already started, stopping or stopped: nothing to do
    if rec.state in (S.FAILED, S.UNHEALTHY) and rec.next_restart_at is None:
        return rec  # final failure, or unhealthy with a live process handled elsewhere
    if rec.port is None:
        fail_final(ctx, engine_id, "engine has no port reserved")
        return None
    if not port_is_bindable(rec.address or "0.0.0.0", rec.port):
        fail_final(
            ctx,
            engine_id,
            f"port {rec.port} on host {ctx.host} is in use by a program that is not ours",
        )
        return None
    try:
        plan = get_runtime(rec.spec.effective_runtime).build(rec)
    except SagellmError as exc:
        fail_final(ctx, engine_id, f"cannot start runtime {rec.spec.effective_runtime}: {exc}")
        return None
    plan = LaunchPlan(plan.argv, {**plan.env, ENGINE_HOST_ENV: ctx.host}, plan.cwd)
    log_path = ctx.log_path(engine_id)  # spawn() writes a header with time and argv
    try:
        proc = processes.spawn(plan, log_path)
    except (OSError, SagellmError) as exc:
        fail_final(ctx, engine_id, f"spawn failed: {exc}")
        return None
    now = time.time()

    def mark_starting(r: EngineRecord) -> None:
        if r.state not in _RESTARTABLE:
            raise _Abort(r.state.value)
        is_restart = r.state is not S.PENDING
        r.transition(S.STARTING)
        if is_restart and count_restart:
            r.restart_count += 1
        r.pid, r.process_create_time = proc.pid, proc.create_time
        r.log_path = str(log_path)
        r.start_deadline = now + ctx.settings.start_timeout_s
        r.next_restart_at = None
        r.health_failures = 0
        r.exit_code = None

    try:
        rec = ctx.registry.update(engine_id, mark_starting)
    except (_Abort, NotFoundError):
        # Stopped (or forgotten) while we were spawning: the process must not live on.
        kill_process(ctx, proc.pid, proc.create_time, engine_id)
        return None
    ctx.manifests.write(rec)
    log.info("engine %s spawned: pid %s, port %s", engine_id, proc.pid, rec.port)
    return rec


# ----------------------------------------------------------------------------- readiness


def check_start(ctx: HostContext, engine_id: str) -> str:
    """One readiness check of a STARTING engine: ``running``, ``waiting``, ``failed``
    or the engine's state when it is not STARTING."""
    rec = ctx.registry.find(engine_id)
    if rec is None:
        return "gone"
    if rec.state is not S.STARTING:
        return rec.state.value.lower()
    if not _alive(rec):
        processes.reap_children()
        handle_dead(ctx, rec, "engine process exited before it was ready")
        return "failed"
    ready = get_runtime(rec.spec.effective_runtime).probe(
        rec, ctx.http, ctx.settings.health_timeout_s
    )
    if ready.ready:
        pid = rec.pid

        def mark_running(r: EngineRecord) -> None:
            if r.state is not S.STARTING or r.pid != pid:
                raise _Abort(r.state.value)
            r.transition(S.RUNNING)
            r.health_failures = 0
            r.last_health_at = time.time()

        try:
            rec = ctx.registry.update(engine_id, mark_running)
        except (_Abort, NotFoundError):
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


# ----------------------------------------------------------------------------- failure


def handle_dead(ctx: HostContext, rec: EngineRecord, reason: str) -> EngineRecord | None:
    """The engine's process is gone: schedule a restart with backoff, or fail for good."""
    code = processes.exit_code(rec.pid) if rec.pid is not None else None
    tail = _tail(rec)
    error = reason + (f" (exit code {code})" if code is not None else "")
    if tail:
        error += f"; last log lines:\n{tail}"
    if not ctx.policy.can_restart(rec.restart_count):
        return fail_final(
            ctx, rec.id, error + f"; gave up after {rec.restart_count} restart(s)", pid=rec.pid
        )
    delay = ctx.policy.restart_delay(rec.restart_count)

    def mark_pending_restart(r: EngineRecord) -> None:
        if r.pid != rec.pid or r.state in (S.STOPPING, S.STOPPED):
            raise _Abort("handled elsewhere")
        target = pending_restart_state(r.state)
        if r.state is not target:
            r.transition(target, error=error)
        r.last_error = error
        r.exit_code = code
        r.pid = r.process_create_time = None
        r.next_restart_at = time.time() + delay

    try:
        updated = ctx.registry.update(rec.id, mark_pending_restart)
    except (_Abort, NotFoundError, IllegalTransition):
        return None
    log.warning("engine %s died (%s); restart in %.1fs", rec.id, reason, delay)
    from workers.dispatch import send_to_host

    send_to_host(
        ctx.celery,
        ctx.host,
        "sagellm.restart_engine",
        (rec.id,),
        expires_s=60 + delay,
        countdown_s=delay,
    )
    return updated


def fail_final(
    ctx: HostContext, engine_id: str, error: str, *, pid: int | None = None
) -> EngineRecord | None:
    """FAILED for good: record why, release GPU memory and port exactly once."""

    def mark_failed(r: EngineRecord) -> None:
        if pid is not None and r.pid not in (pid, None):
            raise _Abort("another process took over")
        if r.state in (S.STOPPING, S.STOPPED):
            raise _Abort("being stopped")
        if r.state is S.RUNNING:
            r.transition(S.UNHEALTHY)
        if r.state is not S.FAILED:
            r.transition(S.FAILED, error=error)
        r.last_error = error
        r.next_restart_at = None
        r.pid = r.process_create_time = None

    try:
        rec = ctx.registry.update(engine_id, mark_failed)
    except (_Abort, NotFoundError, IllegalTransition):
        return None
    if ctx.ledger.release(engine_id):
        log.warning("engine %s FAILED: %s", engine_id, error.splitlines()[0])
    ctx.manifests.remove(engine_id)
    return rec


# ----------------------------------------------------------------------------- stop


def stop_engine(ctx: HostContext, engine_id: str) -> EngineRecord | None:
    """Graceful stop: SIGTERM the process group, grace, SIGKILL; then release once."""
    rec = ctx.registry.find(engine_id)
    if rec is None:
        ctx.ledger.release(engine_id)
        return None
    if rec.state in (S.STARTING, S.RUNNING, S.UNHEALTHY, S.PENDING, S.LOST):
        try:
            rec = ctx.registry.transition(engine_id, S.STOPPING)
        except IllegalTransition:
            rec = ctx.registry.get(engine_id)
    if rec.pid is not None:
        kill_process(ctx, rec.pid, rec.process_create_time, engine_id)
    return finalize_stop(ctx, engine_id)


def finalize_stop(ctx: HostContext, engine_id: str) -> EngineRecord | None:
    """STOPPING -> STOPPED and release; safe to call from racing paths."""
    rec: EngineRecord | None = None
    try:
        rec = ctx.registry.transition(engine_id, S.STOPPED, pid=None, process_create_time=None)
    except IllegalTransition:
        rec = ctx.registry.find(engine_id)
    except NotFoundError:
        rec = None
    if ctx.ledger.release(engine_id):
        log.info("engine %s stopped; GPU memory and port released", engine_id)
    if rec is None or rec.state in (S.STOPPED, S.FAILED):
        ctx.manifests.remove(engine_id)
    return rec


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
    elif s in (S.FAILED, S.UNHEALTHY) and rec.next_restart_at is not None:
        if now >= rec.next_restart_at:
            spawn_engine(ctx, rec.id)
    elif s in (S.RUNNING, S.UNHEALTHY):
        if not _alive(rec):
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
        if not _alive(rec):
            finalize_stop(ctx, rec.id)
        elif now - rec.state_changed_at > ctx.settings.stop_grace_s + 30:
            stop_engine(ctx, rec.id)  # the stop task was lost
    elif s is S.LOST:
        reconcile_lost(ctx, rec)


def _record_health(
    ctx: HostContext, rec: EngineRecord, verdict: Verdict, failures: int, detail: str
) -> None:
    def apply(r: EngineRecord) -> None:
        if r.pid != rec.pid or r.state not in (S.RUNNING, S.UNHEALTHY):
            raise _Abort("changed")
        r.health_failures = failures
        if verdict is Verdict.HEALTHY:
            r.last_health_at = time.time()
            if r.state is S.UNHEALTHY:
                r.transition(S.RUNNING)
        elif verdict is Verdict.UNHEALTHY:
            r.transition(S.UNHEALTHY, error=f"{failures} failed health checks ({detail})")

    with contextlib.suppress(_Abort, NotFoundError, IllegalTransition):
        ctx.registry.update(rec.id, apply)


def reconcile_lost(ctx: HostContext, rec: EngineRecord) -> None:
    """Our host is back: a LOST engine is RUNNING again if its process lives, else it died."""
    if not _alive(rec):
        handle_dead(ctx, rec, "engine process gone while its host was down")
        return
    ensure_reserved(ctx, rec)
    ok, detail = probe_health(ctx, rec)

    def back(r: EngineRecord) -> None:
        if r.state is not S.LOST:
            raise _Abort("changed")
        r.transition(S.RUNNING if ok else S.UNHEALTHY, error=None if ok else detail)
        r.health_failures = 0 if ok else 1

    with contextlib.suppress(_Abort, NotFoundError, IllegalTransition):
        ctx.registry.update(rec.id, back)


def ensure_reserved(ctx: HostContext, rec: EngineRecord) -> None:
    """Re-take the ledger reservation of a live engine if the ledger lost it."""
    if rec.port is None or ctx.ledger.reservation(rec.id) is not None:
        return
    lo, hi = ctx.settings.port_range
    try:
        ctx.ledger.reserve(
            rec.id,
            ctx.host,
            [(g.uuid, g.memory_mib) for g in rec.gpus],
            port=rec.port,
            port_range=(min(lo, rec.port), max(hi, rec.port)),
            # The engine already runs and holds this memory: the margin is for new ones.
            margin_mib=0,
        )
    except ReservationConflict as exc:
        message = f"re-reservation failed: {exc.message}"
        log.error("engine %s: %s", rec.id, message)
        with contextlib.suppress(NotFoundError):
            ctx.registry.update(rec.id, lambda r: setattr(r, "last_error", message))


def check_host(ctx: HostContext) -> dict[str, int]:
    """The health loop for every engine of this host; returns counts by state."""
    processes.reap_children()
    now = time.time()
    counts: dict[str, int] = {}
    for rec in ctx.registry.engines(host=ctx.host):
        counts[rec.state.value] = counts.get(rec.state.value, 0) + 1
        try:
            check_engine(ctx, rec, now)
        except Exception:
            log.exception("health check of %s failed", rec.id)
    return counts


def manual_restart(ctx: HostContext, engine_id: str) -> EngineRecord | None:
    """A restart a person asked for: stop the process, start it again at once.

    It does not count against ``SAGELLM_MAX_RESTARTS`` (that budget is for crashes).
    """
    rec = ctx.registry.find(engine_id)
    if rec is None or rec.host != ctx.host:
        return None
    if rec.pid is not None:
        kill_process(ctx, rec.pid, rec.process_create_time, engine_id)

    def pending(r: EngineRecord) -> None:
        if r.state in (S.STOPPING, S.STOPPED):
            raise _Abort("being stopped")
        if r.state is not S.PENDING:
            target = pending_restart_state(r.state)
            if r.state is not target:
                r.transition(target)
        r.pid = r.process_create_time = None
        r.next_restart_at = time.time()
        r.last_error = "restart requested"

    try:
        ctx.registry.update(engine_id, pending)
    except (_Abort, NotFoundError, IllegalTransition):
        return ctx.registry.find(engine_id)
    ensure_reserved(ctx, ctx.registry.get(engine_id))
    return spawn_engine(ctx, engine_id, count_restart=False)


def read_log(ctx: HostContext, engine_id: str, tail: int) -> list[str]:
    """The last ``tail`` lines of the engine's log on this host."""
    path = ctx.log_path(engine_id)
    if not path.exists():
        return []
    return processes.tail_log(path, tail).splitlines()
