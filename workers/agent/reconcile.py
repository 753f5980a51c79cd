"""Rediscovery: make the registry and ledger match the processes on this host.

Runs when the worker starts, periodically (beat), and at once from the heartbeat when
the host's capacity is missing from Redis (a lost Redis or ``FLUSHALL``). Its rule:
**every process of ours is accounted for** — adopted with its reservation, or
stopped, never ignored. In order, under ``ctx.reclaim_lock``:

1. For each engine process on this host (found by its ``SAGELLM_ENGINE_ID`` tag, or by
   the pid and create time in its manifest, since vLLM's setproctitle wipes tags):
   with no record, it is adopted from its manifest (record and reservation re-taken
   in one write) or, without a manifest, stopped; with a final record (STOPPED, final
   FAILED) or a STOPPING one, it is stopped; a record that lost track of it is
   re-linked; then its reservation is re-taken if the ledger lost it.
2. Only then is the host's capacity published, so no start elsewhere can take the
   room of an engine that is running but not yet re-reserved.
3. Records whose process is gone are handled (restart or fail; STOPPING: STOPPED);
   reservations that no live record of this host owns are released; manifests of
   ended engines are removed.

It never signals a process that is not provably ours: a tagged one of this host, or
the exact process (pid + create time) a manifest of this host names.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import psutil

from app.core.engine_policy import ENGINE_HOST_ENV, ENGINE_OWNER_ENV
from app.core.errors import NotFoundError, ReservationConflict
from app.core.models import LIVE_STATES, STOPPING_STATES, EngineRecord, EngineState
from app.state.registry import RecordExists
from workers.agent import lifecycle, supervise
from workers.agent.context import HostContext
from workers.agent.heartbeat import publish_heartbeat
from workers.host import processes
from workers.runtimes import get_runtime

log = logging.getLogger(__name__)
S = EngineState


@dataclass
class RediscoveryReport:
    adopted: list[str] = field(default_factory=list)
    relinked: list[str] = field(default_factory=list)
    stopped_orphans: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    unreserved: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Found:
    """A live engine process of this host and where we learnt of it."""

    pid: int
    create_time: float
    # A session leader (what ``spawn`` started); False: a worker its dead leader left
    # behind, which is stopped, never adopted.
    leader: bool = True


def _owner_tags(pid: int) -> tuple[str | None, str | None]:
    """The host and owner (worker directory) an engine process was started for."""
    try:
        env = psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return None, None
    return env.get(ENGINE_HOST_ENV), env.get(ENGINE_OWNER_ENV)


def host_engine_processes(ctx: HostContext) -> dict[str, Found]:
    """Live engine processes of this worker, by engine id: tagged ones started by this
    worker's directory (or, from an older version without that tag, for this host
    name), untagged-host ones we have a manifest for, and the exact processes our
    manifests name (a leader whose tag setproctitle wiped). Another cluster's engines
    on this machine, even under the same host name, are never ours."""
    manifest_ids = ctx.manifests.ids()
    me = str(ctx.host_dir)
    found: dict[str, Found] = {}
    for eid, proc in processes.find_tagged_processes().items():
        host, owner = _owner_tags(proc.pid)
        legacy = owner is None and (host == ctx.host or (host is None and eid in manifest_ids))
        if owner == me or legacy:
            found[eid] = Found(proc.pid, proc.create_time, proc.session_leader)
    for eid in manifest_ids - set(found):
        m = ctx.manifests.read(eid)
        if m is not None and m.pid is not None and processes.is_alive(m.pid, m.process_create_time):
            found[eid] = Found(m.pid, m.process_create_time or 0.0)
    return found


def rediscover(ctx: HostContext) -> RediscoveryReport:
    report = RediscoveryReport()
    with ctx.reclaim_lock:
        found = host_engine_processes(ctx)
        for _ in range(3):
            for eid, proc in found.items():
                with ctx.engine_lock(eid):
                    try:
                        _account(ctx, eid, proc, report)
                    except NotFoundError:
                        continue  # deleted meanwhile: the next pass sees it again
            # Capacity only now, and only if every live engine still holds its room
            # (Redis may have been lost again meanwhile: then account once more).
            held_by = _must_hold(ctx, found, set(report.stopped_orphans))
            if not publish_heartbeat(ctx, held_by=held_by):
                break
        else:
            log.error(
                "rediscovery on %s: reservations keep vanishing; capacity not offered", ctx.host
            )
    _handle_gone(ctx, found, report)
    _release_leaks(ctx, found, report)
    if any(report.to_dict().values()):
        log.info("rediscovery on %s: %s", ctx.host, report.to_dict())
    return report


def _stop_orphan(
    ctx: HostContext, eid: str, proc: Found, why: str, report: RediscoveryReport
) -> None:
    lifecycle.note(ctx, eid, f"stopping process {proc.pid}: {why}")
    lifecycle.kill_process(ctx, proc.pid, proc.create_time, eid)
    report.stopped_orphans.append(eid)


def _account(ctx: HostContext, eid: str, proc: Found, report: RediscoveryReport) -> None:
    """Make one live engine process accounted for (see the module docstring, step 1)."""
    rec = ctx.registry.find(eid)
    if not proc.leader:
        # Its leader died (while no worker watched): not an engine. The engine, if its
        # record lives on, is dead; the health loop takes it from there.
        lifecycle.note(
            ctx, eid, f"stopping process {proc.pid}: a worker left behind by its dead leader"
        )
        processes.stop_left_behind(eid, proc.pid, proc.create_time, ctx.settings.stop_grace_s)
        report.stopped_orphans.append(eid)
        return
    if rec is None:
        manifest = ctx.manifests.read(eid)
        if manifest is None or manifest.owns_nothing:
            _stop_orphan(
                ctx, eid, proc, "no record and no manifest: nothing says what it is", report
            )
            ctx.manifests.remove(eid)
            return
        if manifest.state is S.STOPPING:
            _stop_orphan(ctx, eid, proc, "it was being stopped when its record was lost", report)
            ctx.manifests.remove(eid)
            return
        _adopt(ctx, manifest, proc, report)
        return
    if rec.host != ctx.host:
        return
    if rec.owns_nothing:
        _stop_orphan(ctx, eid, proc, f"its engine is {rec.state.value}", report)
        ctx.manifests.remove(eid)
        return
    if rec.state is S.STOPPING:
        lifecycle.stop_engine(ctx, eid)
        return
    if rec.pid != proc.pid:
        if rec.pid is not None and processes.is_alive(rec.pid, rec.process_create_time):
            # Two process trees for one engine: the recorded one stays.
            _stop_orphan(ctx, eid, proc, f"a second process; the engine runs as {rec.pid}", report)
            return
        relinked = lifecycle.relink(ctx, rec, proc.pid, proc.create_time)
        if relinked is None:
            return
        rec = relinked
        report.relinked.append(eid)
    if rec.state is S.LOST:
        supervise.reconcile_lost(ctx, rec)
    elif not supervise.ensure_reserved(ctx, rec):
        report.unreserved.append(eid)


def _adopt(ctx: HostContext, rec: EngineRecord, proc: Found, report: RediscoveryReport) -> None:
    """Re-create a lost record from the host's manifest and re-take its reservation
    in the same write (or record why it could not be)."""
    ready = get_runtime(rec.spec.effective_runtime).probe(
        rec, ctx.http, ctx.settings.health_timeout_s
    )
    rec.adopt(
        proc.pid,
        proc.create_time,
        ready=ready.ready,
        start_deadline=time.time() + ctx.settings.start_timeout_s,
    )
    try:
        holds = rec.host is not None and rec.port is not None
        ctx.registry.create(
            rec, reserve=lifecycle.room_of(ctx, rec, reclaim=True) if holds else None
        )
    except RecordExists:
        return  # adopted concurrently
    except ReservationConflict as exc:  # the room is taken: adopt without it, visibly
        message = f"running without its reservation: {exc.message}"
        rec.mark_unreserved(message)
        try:
            ctx.registry.create(rec)
        except RecordExists:
            return
        lifecycle.note(ctx, rec.id, message)
        report.unreserved.append(rec.id)
    ctx.manifests.write(rec)
    lifecycle.note(ctx, rec.id, f"re-adopted process {proc.pid} after the registry lost it")
    report.adopted.append(rec.id)


def _handle_gone(ctx: HostContext, found: dict[str, Found], report: RediscoveryReport) -> None:
    """Live records of this host whose process is gone: restart, fail or finish stop."""
    for rec in ctx.registry.engines(host=ctx.host, state=LIVE_STATES | {S.LOST}):
        if rec.id in found:
            continue
        with ctx.engine_lock(rec.id, blocking=False) as free:
            if not free:
                continue  # being started or stopped right now
            cur = ctx.registry.find(rec.id)
            if cur is None or cur.owns_nothing or cur.state not in LIVE_STATES | {S.LOST}:
                continue
            if cur.pid is None and (cur.state is S.PENDING or cur.restart_pending):
                continue  # its start or restart is pending: spawn handles it
            if cur.pid is not None and processes.is_alive(cur.pid, cur.process_create_time):
                continue
            report.gone.append(cur.id)
            if cur.state in STOPPING_STATES or cur.pid is None:
                lifecycle.finalize_stop(ctx, cur.id)
            else:
                supervise.handle_dead(ctx, cur, "engine process gone (found by rediscovery)")


def _release_leaks(ctx: HostContext, found: dict[str, Found], report: RediscoveryReport) -> None:
    for eid in ctx.ledger.reserved_engines():
        res = ctx.ledger.reservation(eid)
        if res is None or res.host != ctx.host or eid in found:
            continue
        rec = ctx.registry.find(eid)
        if rec is None or rec.owns_nothing:
            if ctx.ledger.release(eid):
                report.released.append(eid)
            ctx.manifests.remove(eid)
    for eid in ctx.manifests.ids() - set(found):
        # Its leader is gone. What it left in its session (renamed TP workers, whose
        # tags setproctitle wiped) is known only through the manifest when the record
        # went too (a crash just before Redis was lost): sweep it.
        m = ctx.manifests.read(eid)
        if m is not None and m.pid is not None:
            processes.sweep_session(m.pid, m.process_create_time, ctx.settings.stop_grace_s)
        rec = ctx.registry.find(eid)
        if rec is None or rec.owns_nothing:
            ctx.manifests.remove(eid)


def _must_hold(ctx: HostContext, found: dict[str, Found], skip: set[str]) -> list[str]:
    """Engines of this host that run and must hold a reservation before capacity is
    offered: live processes with a non-final record (or none yet), minus ``skip``."""
    out = []
    for eid in found:
        if eid in skip:
            continue
        rec = ctx.registry.find(eid)
        if rec is not None and (rec.owns_nothing or rec.reservation_error):
            continue
        out.append(eid)
    return out


def heartbeat_or_rediscover(ctx: HostContext) -> None:
    """The heartbeat thread's step. Publish this host's record and capacity, but only
    while every running engine of this host holds its reservation (checked in the same
    atomic step as the publish); when Redis lost them (or the capacity itself), run
    rediscovery first, which re-takes them and then publishes."""
    with ctx.reclaim_lock:
        if ctx.ledger.has_capacity(ctx.host):
            manifests = ctx.manifests.ids()
            alive = {
                eid: Found(m.pid, m.process_create_time or 0.0)
                for eid in manifests
                if (m := ctx.manifests.read(eid)) is not None
                and m.pid is not None
                and processes.is_alive(m.pid, m.process_create_time)
            }
            if not publish_heartbeat(ctx, held_by=_must_hold(ctx, alive, set())):
                return
    rediscover(ctx)
