"""Engine lifecycle on this host: spawn (or re-link) an engine's process, fail it for
good, stop it. The health loop that watches what runs (readiness, health, death and
restart) is ``workers.agent.supervise``.

Each function re-reads the record and acts on its *current* state, so a task that is
delivered twice, or two paths racing (health loop vs. readiness watch vs. stop), do
no harm: in this worker one operation at a time acts on an engine
(``ctx.engine_lock``); across processes every write is one atomic compare-and-set of
the record that also releases the reservation when the engine ends (STOPPED, final
FAILED) and refuses to record a process for an engine that no longer holds its room.
What each write may change is the record's own rule (``EngineRecord.mark_starting``,
``fail``, ...): a rule that no longer holds raises ``IllegalTransition`` and nothing
is written.

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
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence

from app.core.engine_policy import ENGINE_HOST_ENV, ENGINE_OWNER_ENV
from app.core.errors import IllegalTransition, NotFoundError, ReservationConflict, SagellmError
from app.core.failures import Failure, classify
from app.core.models import EngineRecord, EngineState
from app.state.events import EngineEvents, encode_event
from app.state.ledger import ReserveRequest, Unreserved, port_is_bindable
from workers.agent import drain
from workers.agent.context import HostContext
from workers.host import processes
from workers.runtimes import get_runtime
from workers.runtimes.base import LaunchPlan

log = logging.getLogger(__name__)
S = EngineState


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


def process_alive(rec: EngineRecord) -> bool:
    """The engine's recorded process (pid + create time) still runs."""
    return rec.pid is not None and processes.is_alive(rec.pid, rec.process_create_time)


def note(ctx: HostContext, engine_id: str, message: str) -> None:
    """Say something about an engine in its own log (what a user reads) and ours."""
    log.warning("engine %s: %s", engine_id, message)
    try:
        with ctx.log_path(engine_id).open("a") as f:
            f.write(f"=== sagellm {time.strftime('%Y-%m-%d %H:%M:%S')}: {message}\n")
    except OSError:
        pass


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
    ctx: HostContext, engine_id: str, *, count_restart: bool = True, evicted: bool = False
) -> EngineRecord | None:
    """Start the engine's process (first start or a due restart) and mark it STARTING.

    An engine that took the room of evicted engines (``waits_for``) spawns only once
    their processes are gone: this hands it to a thread that waits for them (at most
    a drain and a stop grace) and calls back with ``evicted``.

    Returns the record, or None when the engine is not (or no longer) ours to start.
    """
    with ctx.engine_lock(engine_id):
        return _spawn_locked(ctx, engine_id, count_restart, evicted)


def _evicting(victim: EngineRecord, engine_id: str) -> bool:
    """``victim`` is still on its way out after handing its room to ``engine_id``."""
    return victim.evicted_for == engine_id and victim.state in (S.DRAINING, S.STOPPING, S.LOST)


def _after_evictions(ctx: HostContext, rec: EngineRecord) -> None:
    """Drain and stop the engines ``rec`` evicted (on this host), wait until their
    processes are gone, then spawn ``rec``."""
    limit = ctx.settings.drain_timeout_s + ctx.settings.stop_grace_s + 30.0

    def run() -> None:
        deadline = time.monotonic() + limit
        for victim in rec.waits_for:
            with contextlib.suppress(NotFoundError):
                stop_engine(ctx, victim)  # a drain watch: returns at once
        for victim in rec.waits_for:
            with contextlib.suppress(NotFoundError):
                ctx.registry.wait(
                    victim,
                    lambda v: not _evicting(v, rec.id),
                    max(0.0, deadline - time.monotonic()),
                )
        try:
            spawn_engine(ctx, rec.id, evicted=True)
        except Exception:
            log.exception("engine %s: spawn after evictions failed", rec.id)

    threading.Thread(target=run, name=f"sagellm-evict-{rec.id}", daemon=True).start()


def _spawn_locked(
    ctx: HostContext, engine_id: str, count_restart: bool, evicted: bool = False
) -> EngineRecord | None:
    rec = ctx.registry.find(engine_id)
    if rec is None or rec.host != ctx.host:
        return None
    if not rec.awaits_spawn or process_alive(rec):
        return rec  # started, stopping, stopped, failed for good: nothing to do
    if rec.waits_for and not evicted:
        victims = [ctx.registry.find(v) for v in rec.waits_for]
        if any(v is not None and _evicting(v, rec.id) for v in victims):
            _after_evictions(ctx, rec)
            return rec
    # One process tree per engine: a worker that died between spawning and recording
    # left a live tagged process; adopt it rather than start a second one. Only a
    # leader is an engine: workers a dead leader left behind are stopped.
    found = processes.find_engine_leader(engine_id, ctx.settings.stop_grace_s)
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
        plan = get_runtime(rec.spec.effective_runtime).build(rec, ctx.settings.engine_policy())
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
    deadline = time.time() + ctx.settings.start_timeout_s
    try:
        rec = ctx.registry.update(
            engine_id,
            lambda r: r.mark_starting(
                proc.pid,
                proc.create_time,
                log_path=str(log_path),
                start_deadline=deadline,
                count_restart=count_restart,
            ),
            require_reserved=True,
        )
    except BaseException as exc:
        # Stopped, forgotten or its room released while we were spawning, or Redis
        # failed: the process must not live on unrecorded.
        kill_process(ctx, proc.pid, proc.create_time, engine_id)
        if isinstance(exc, NotFoundError | Unreserved | IllegalTransition):
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
    deadline = time.time() + ctx.settings.start_timeout_s
    log_path = str(ctx.log_path(rec.id))
    try:
        updated = ctx.registry.update(
            rec.id,
            lambda r: r.link_process(pid, create_time, log_path=log_path, start_deadline=deadline),
        )
    except (NotFoundError, IllegalTransition):
        return ctx.registry.find(rec.id)
    ctx.manifests.write(updated)
    note(ctx, rec.id, f"re-linked to its live process {pid}")
    return updated


def _forget_manifest_if_final(ctx: HostContext, engine_id: str) -> None:
    rec = ctx.registry.find(engine_id)
    if rec is None or rec.owns_nothing:
        ctx.manifests.remove(engine_id)


# ----------------------------------------------------------------------------- failure


def record_failure(r: EngineRecord, failure: Failure) -> None:
    """Note in the record (in the caller's write) why its process ended: ``failure``,
    and one more of that reason in ``failure_counts``."""
    r.failure = failure.to_dict()
    r.failure_counts[failure.reason] = r.failure_counts.get(failure.reason, 0) + 1


def fail_final(
    ctx: HostContext,
    engine_id: str,
    error: str,
    *,
    pid: int | None = None,
    failure: Failure | None = None,
    events: Sequence[str] = (),
) -> EngineRecord | None:
    """FAILED for good (``EngineRecord.fail``): record why; the same atomic write
    releases GPU memory and port (exactly once). ``failure``: the classified reason
    (``app.core.failures``), else it is read from ``error`` itself; either way it is
    the record's ``failure`` and a ``failed`` event, written with it (after ``events``,
    encoded ``app.state.events.encode_event``s, e.g. the crash that led here)."""
    failure = dataclasses.replace(failure or classify(None, error), at=time.time())

    def apply(r: EngineRecord) -> None:
        r.fail(error, pid=pid)
        record_failure(r, failure)

    event = encode_event("failed", failure.summary(), reason=failure.reason)
    try:
        rec, result = ctx.registry.commit(engine_id, apply, events=[*events, event])
    except (NotFoundError, IllegalTransition):
        return None
    if result.released:
        log.warning("engine %s FAILED: %s", engine_id, error.splitlines()[0])
    ctx.manifests.remove(engine_id)
    return rec


# ----------------------------------------------------------------------------- stop


def stop_engine(ctx: HostContext, engine_id: str, *, drained: bool = False) -> EngineRecord | None:
    """Graceful stop: SIGTERM the process tree, grace, SIGKILL; then STOPPED, with the
    reservation released in the same write. A kill that is refused (the process is not
    provably this engine's) keeps the engine STOPPING with its reservation, and says
    why in ``last_error``.

    A DRAINING engine is handed to the drain watch (``workers.agent.drain``, a thread;
    this returns at once) unless its deadline passed or it is ``drained``: the watch
    calls back here when nothing is in flight any more."""
    with ctx.engine_lock(engine_id):
        rec = ctx.registry.find(engine_id)
        if rec is None:
            ctx.ledger.release(engine_id)
            return None
        if rec.state is S.DRAINING and not drained and not rec.drain_over(time.time()):
            drain.watch(ctx, engine_id, _drain_over)
            return rec
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


def _drain_over(ctx: HostContext, engine_id: str, result: drain.DrainCheck) -> None:
    """The drain watch's end: a timeout is said (events, log), then the normal stop."""
    if result.outcome is drain.Outcome.TIMED_OUT:
        waiting = f"{result.in_flight} request(s) still in flight"
        if result.behind:
            waiting += f", {result.behind} gateway process(es) not caught up"
        message = f"drain timed out ({waiting}): stopping anyway"
        note(ctx, engine_id, message)
        with contextlib.suppress(Exception):
            EngineEvents(ctx.registry.r).add(
                engine_id, "drain_timeout", message, in_flight=result.in_flight
            )
    elif result.outcome is drain.Outcome.GONE:
        note(ctx, engine_id, "its process exited while draining")
    stop_engine(ctx, engine_id, drained=True)


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
    try:
        rec, result = ctx.registry.commit(engine_id, EngineRecord.mark_stopped)
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


def read_log(ctx: HostContext, engine_id: str, tail: int) -> list[str]:
    """The last ``tail`` lines of the engine's log on this host."""
    path = ctx.log_path(engine_id)
    if not path.exists():
        return []
    return processes.tail_log(path, tail).splitlines()
