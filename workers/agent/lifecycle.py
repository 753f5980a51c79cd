"""Engine lifecycle on this host: spawn, watch readiness, health, restart, stop.

Each function re-reads the record and acts on its *current* state, so a task that is
delivered twice, or two paths racing (health loop vs. readiness watch vs. stop), do
no harm: in this worker one operation at a time acts on an engine
(``ctx.engine_lock``); across processes every write is one atomic compare-and-set of
the record that also releases the reservation when the engine ends (STOPPED, final
FAILED) and refuses to record a process for an engine that no longer holds its room.

Rules that keep every process accounted for:

* one process tree per engine: before spawning, a live process carrying the engine's
  tag (left by a worker that died between spawn and record) is adopted instead;
* the manifest (the host's copy of the record) is written before the spawn, so a
  process whose record could not be written is still known to rediscovery, and the
  process is killed when its record cannot be written;
* a dead engine's leftovers (vLLM's engine-core and TP workers, whose tags
  setproctitle wiped) are swept through the session the leader led;
* a refused kill keeps the reservation and says why.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from app.core.engine_policy import EnginePolicy
from app.core.errors import IllegalTransition, NotFoundError, ReservationConflict, SagellmError
from app.core.health import Verdict, pending_restart_state
from app.core.models import EngineRecord, EngineState
from app.state.ledger import ReserveRequest, Unreserved, port_is_bindable
from workers.agent.context import ENGINE_HOST_ENV, ENGINE_OWNER_ENV, HostContext
from workers.host import processes
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
    """Stop an engine's process tree (SIGTERM, grace, SIGKILL). A process that is not
    provably this engine's is never signalled: logged, left alone, and None returned."""
    try:
        return processes.stop(pid, create_time, ctx.settings.stop_grace_s, engine_id=engine_id)
    except processes.NotOurProcess as exc:
        log.error("engine %s: not stopping pid %s: %s", engine_id, pid, exc)
        return None


def _alive(rec: EngineRecord) -> bool:
    return rec.pid is not None and processes.is_alive(rec.pid, rec.process_create_time)


def note(ctx: HostContext, engine_id: str, message: str) -> None:
    """Say something about an engine in its own log (what a user reads) and ours."""
    log.warning("engine %s: %s", engine_id, message)
    try:
        with ctx.log_path(engine_id).open("a") as f:
            f.write(f"=== sagellm {time.strftime('%Y-%m-%d %H:%M:%S')}: {message}\n")
    except OSError:
        pass


# ----------------------------------------------------------------------------- spawn


def _reserve_again(ctx: HostContext, rec: EngineRecord) -> bool:
    """A restart-pending engine whose room is gone takes it again (as a new request,
    margin included) before anything is spawned; False when it no longer fits."""
    try:
        ctx.registry.update(rec.id, lambda r: None, reserve=room_of(ctx, rec, reclaim=False))
    except ReservationConflict as exc:
        fail_final(ctx, rec.id, f"its GPU memory or port was taken while it was down: {exc}")
        return False
    return True


def spawn_engine(
    ctx: HostContext, engine_id: str, *, count_restart: bool = True
) -> EngineRecord | None:
    """Start the engine's process (first start or a due restart) and mark it STARTING.

    Returns the record, or None when the engine is not (or no longer) ours to start.
    """
    with ctx.engine_lock(engine_id):
        return _spawn_locked(ctx, engine_id, count_restart)


def _spawn_locked(ctx: HostContext, engine_id: str, count_restart: bool) -> EngineRecord | None:
    rec = ctx.registry.find(engine_id)
    if rec is None or rec.host != ctx.host:
        return None
    if rec.state not in _RESTARTABLE or _alive(rec):
        return rec  # already started, stopping or stopped: nothing to do
    if rec.state is not S.PENDING and rec.next_restart_at is None:
        return rec  # final failure, or a live process handled elsewhere
    # One process tree per engine: a worker that died between spawning and recording
    # left a live tagged process; adopt it rather than start a second one.
    found = processes.find_tagged_processes().get(engine_id)
    if found is not None:
        return relink(ctx, rec, found.pid, found.create_time)
    if rec.port is None:
        fail_final(ctx, engine_id, "engine has no port reserved")
        return None
    if ctx.ledger.reservation(engine_id) is None and not _reserve_again(ctx, rec):
        return None
    if not port_is_bindable(rec.address or "0.0.0.0", rec.port):
        fail_final(
            ctx,
            engine_id,
            f"port {rec.port} on host {ctx.host} is in use by a program that is not ours",
        )
        return None
    try:
        plan = get_runtime(rec.spec.effective_runtime).build(
            rec, EnginePolicy.from_settings(ctx.settings)
        )
    except SagellmError as exc:
        fail_final(ctx, engine_id, f"cannot start runtime {rec.spec.effective_runtime}: {exc}")
        return None
    tags = {ENGINE_HOST_ENV: ctx.host, ENGINE_OWNER_ENV: str(ctx.host_dir)}
    plan = LaunchPlan(plan.argv, {**plan.env, **tags}, plan.cwd)
    log_path = ctx.log_path(engine_id)  # spawn() writes a header with time and argv
    # The host's copy first: a process whose record never gets written is still known.
    ctx.manifests.write(rec)
    try:
        proc = processes.spawn(plan, log_path)
    except (OSError, SagellmError) as exc:
        fail_final(ctx, engine_id, f"spawn failed: {exc}")
        return None
    now = time.time()

    def mark_starting(r: EngineRecord) -> None:
        if r.state not in _RESTARTABLE or (r.state is not S.PENDING and r.next_restart_at is None):
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
        r.running_since = None

    try:
        rec = ctx.registry.update(engine_id, mark_starting, require_reserved=True)
    except BaseException as exc:
        # Stopped, forgotten or its room released while we were spawning, or Redis
        # failed: the process must not live on unrecorded.
        kill_process(ctx, proc.pid, proc.create_time, engine_id)
        if isinstance(exc, _Abort | NotFoundError | Unreserved | IllegalTransition):
            note(ctx, engine_id, f"spawned process {proc.pid} stopped: {exc or 'record changed'}")
            _forget_manifest_if_final(ctx, engine_id)
            return None
        raise
    ctx.manifests.write(rec)
    log.info("engine %s spawned: pid %s, port %s", engine_id, proc.pid, rec.port)
    return rec


def relink(
    ctx: HostContext, rec: EngineRecord, pid: int, create_time: float
) -> EngineRecord | None:
    """Record a live process of this engine that its record lost track of (a worker
    died between spawn and record): a PENDING or restart-pending engine becomes
    STARTING, with its manifest written."""
    now = time.time()

    def link(r: EngineRecord) -> None:
        if r.owns_nothing:
            raise _Abort(r.state.value)
        if r.state is S.PENDING or (
            r.state in (S.FAILED, S.UNHEALTHY) and r.next_restart_at is not None
        ):
            r.transition(S.STARTING)
            r.start_deadline = now + ctx.settings.start_timeout_s
            r.health_failures = 0
        r.pid, r.process_create_time = pid, create_time
        r.next_restart_at = None
        r.log_path = r.log_path or str(ctx.log_path(r.id))

    try:
        updated = ctx.registry.update(rec.id, link)
    except (_Abort, NotFoundError, IllegalTransition):
        return ctx.registry.find(rec.id)
    ctx.manifests.write(updated)
    note(ctx, rec.id, f"re-linked to its live process {pid}")
    return updated


def _forget_manifest_if_final(ctx: HostContext, engine_id: str) -> None:
    rec = ctx.registry.find(engine_id)
    if rec is None or rec.owns_nothing:
        ctx.manifests.remove(engine_id)


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
            r.last_health_at = r.running_since = time.time()
            if r.reservation_error:
                r.transition(S.UNHEALTHY, error=r.reservation_error)

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

    def mark_pending_restart(r: EngineRecord) -> None:
        if r.pid != rec.pid or r.state in (S.STOPPING, S.STOPPED):
            raise _Abort("handled elsewhere")
        target = pending_restart_state(r.state)
        if r.state is not target:
            r.transition(target, error=error)
        r.last_error = error
        r.exit_code = code
        r.restart_count = restarts
        r.pid = r.process_create_time = r.running_since = None
        r.next_restart_at = time.time() + delay

    try:
        updated = ctx.registry.update(rec.id, mark_pending_restart)
    except (_Abort, NotFoundError, IllegalTransition):
        return None
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


def fail_final(
    ctx: HostContext, engine_id: str, error: str, *, pid: int | None = None
) -> EngineRecord | None:
    """FAILED for good: record why; the same atomic write releases GPU memory and port
    (exactly once)."""

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
        r.pid = r.process_create_time = r.running_since = None

    try:
        rec, result = ctx.registry.commit(engine_id, mark_failed)
    except (_Abort, NotFoundError, IllegalTransition):
        return None
    if result.released:
        log.warning("engine %s FAILED: %s", engine_id, error.splitlines()[0])
    ctx.manifests.remove(engine_id)
    return rec


# ----------------------------------------------------------------------------- stop


def stop_engine(ctx: HostContext, engine_id: str) -> EngineRecord | None:
    """Graceful stop: SIGTERM the process tree, grace, SIGKILL; then STOPPED, with the
    reservation released in the same write. A kill that is refused (the process is not
    provably this engine's) keeps the engine STOPPING with its reservation, and says
    why in ``last_error``."""
    with ctx.engine_lock(engine_id):
        rec = ctx.registry.find(engine_id)
        if rec is None:
            ctx.ledger.release(engine_id)
            return None
        rec = ctx.registry.update(engine_id, EngineRecord.request_stop)
        if rec.state is S.STOPPED:
            ctx.manifests.remove(engine_id)
            return rec
        if rec.state is not S.STOPPING:
            return rec
        pid, create_time = rec.pid, rec.process_create_time
        if pid is None:
            # Spawned by a worker that died before recording it? Find it by its tag.
            found = processes.find_tagged_processes().get(engine_id)
            if found is not None:
                pid, create_time = found.pid, found.create_time
        if pid is not None and kill_process(ctx, pid, create_time, engine_id) is None:
            message = (
                f"stop refused: pid {pid} does not carry this engine's identity; "
                "its GPU memory and port stay reserved"
            )
            if rec.last_error != message:  # said once, not on every health tick
                note(ctx, engine_id, message)
            with contextlib.suppress(NotFoundError):
                ctx.registry.update(engine_id, lambda r: setattr(r, "last_error", message))
            return ctx.registry.find(engine_id)
        return finalize_stop(ctx, engine_id)


def finalize_stop(ctx: HostContext, engine_id: str) -> EngineRecord | None:
    """STOPPING -> STOPPED, releasing in the same write; safe from racing paths.

    The leader is gone by now; whatever it left in its session (renamed TP workers,
    when the stop is finished by rediscovery after a crash) is swept first, so a
    STOPPED engine has no process left."""
    current = ctx.registry.find(engine_id)
    if current is not None and current.pid is not None:
        processes.sweep_session(current.pid, current.process_create_time, ctx.settings.stop_grace_s)
    rec: EngineRecord | None = None
    released = False

    def stopped(r: EngineRecord) -> None:
        r.transition(S.STOPPED)
        r.pid = r.process_create_time = None

    try:
        rec, result = ctx.registry.commit(engine_id, stopped)
        released = result.released
    except IllegalTransition:
        rec = ctx.registry.find(engine_id)
    except NotFoundError:
        rec = None
        released = ctx.ledger.release(engine_id)
    if released:
        log.info("engine %s stopped; GPU memory and port released", engine_id)
    if rec is None or rec.owns_nothing:
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
        if r.pid != rec.pid or r.state not in (S.RUNNING, S.UNHEALTHY):
            raise _Abort("changed")
        r.health_failures = failures
        if verdict is Verdict.HEALTHY:
            r.last_health_at = time.time()
            if r.state is S.UNHEALTHY and not r.reservation_error:
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
    reserved = ensure_reserved(ctx, rec)
    ok, detail = probe_health(ctx, rec)

    def back(r: EngineRecord) -> None:
        if r.state is not S.LOST:
            raise _Abort("changed")
        healthy = ok and reserved
        r.transition(S.RUNNING if healthy else S.UNHEALTHY)
        if not healthy:
            r.last_error = r.reservation_error or detail
        r.health_failures = 0 if ok else 1

    with contextlib.suppress(_Abort, NotFoundError, IllegalTransition):
        ctx.registry.update(rec.id, back)


def room_of(ctx: HostContext, rec: EngineRecord, *, reclaim: bool) -> ReserveRequest:
    """What ``rec`` holds (its GPUs and port) as a request to take it again: as a new
    request (margin included), or ``reclaim`` for an engine that already runs (see
    ``ReserveRequest``)."""
    assert rec.host is not None and rec.port is not None
    return ReserveRequest(
        rec.host,
        tuple((g.uuid, g.memory_mib) for g in rec.gpus),
        port_range=ctx.settings.port_range,
        margin_mib=ctx.settings.gpu_safety_margin_mib,
        port=rec.port,
        reclaim=reclaim,
    )


def ensure_reserved(ctx: HostContext, rec: EngineRecord) -> bool:
    """Re-take the reservation of a live engine if the ledger lost it (a lost Redis),
    in the same write as its record. When someone else took the room meanwhile, the
    engine is UNHEALTHY with ``reservation_error`` saying why (not routed to), and
    rediscovery tries again. True when the engine holds its reservation."""
    if rec.port is None or rec.host is None or rec.owns_nothing:
        return False
    req = room_of(ctx, rec, reclaim=True)

    def clear(r: EngineRecord) -> None:
        if r.reservation_error:
            r.reservation_error = None
            r.last_error = "reservation re-taken"

    try:
        ctx.registry.update(rec.id, clear, reserve=req)
        return True
    except NotFoundError:
        return False
    except ReservationConflict as exc:
        message = f"running without its reservation: {exc.message}"

        def conflict(r: EngineRecord) -> None:
            r.reservation_error = r.last_error = message
            if r.state is S.RUNNING:
                r.transition(S.UNHEALTHY)

        if rec.reservation_error != message:
            note(ctx, rec.id, message)
        with contextlib.suppress(NotFoundError, IllegalTransition):
            ctx.registry.update(rec.id, conflict)
        return False


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

        def pending(r: EngineRecord) -> None:
            if r.state in (S.STOPPING, S.STOPPED) or r.owns_nothing:
                raise _Abort(r.state.value)
            if r.state is not S.PENDING:
                target = pending_restart_state(r.state)
                if r.state is not target:
                    r.transition(target)
            r.pid = r.process_create_time = r.running_since = None
            r.next_restart_at = time.time()
            r.last_error = "restart requested"

        try:
            ctx.registry.update(engine_id, pending)
        except (_Abort, NotFoundError, IllegalTransition):
            return ctx.registry.find(engine_id)
        return spawn_engine(ctx, engine_id, count_restart=False)


def read_log(ctx: HostContext, engine_id: str, tail: int) -> list[str]:
    """The last ``tail`` lines of the engine's log on this host."""
    path = ctx.log_path(engine_id)
    if not path.exists():
        return []
    return processes.tail_log(path, tail).splitlines()
