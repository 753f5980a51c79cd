"""Rediscovery: make the registry and ledger match the processes on this host.

Runs when the worker starts and periodically (beat). It

* adopts tagged engine processes the registry lacks, rebuilding their records from
  the host's manifests and re-reserving their GPU memory and port (after a Redis
  loss or ``FLUSHALL``);
* re-takes reservations the ledger lost for engines it still has;
* reconciles LOST engines once their host is back;
* handles records whose process is gone (restart or fail) and stops tagged processes
  whose record says they should not run;
* releases reservations that no live engine of this host holds.

It never signals a process without our ``SAGELLM_ENGINE_ID`` tag, nor one tagged for
another host (``SAGELLM_ENGINE_HOST``), nor one it has no manifest or record for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import psutil

from app.core.models import LIVE_STATES, EngineRecord, EngineState
from workers import lifecycle, processes
from workers.context import ENGINE_HOST_ENV, HostContext
from workers.heartbeat import publish_heartbeat
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

    def to_dict(self) -> dict[str, list[str]]:
        return dict(self.__dict__)


def _engine_host(pid: int) -> str | None:
    try:
        return psutil.Process(pid).environ().get(ENGINE_HOST_ENV)
    except (psutil.Error, OSError):
        return None


def _final(rec_state: EngineState, next_restart_at: float | None) -> bool:
    return rec_state is S.STOPPED or (rec_state is S.FAILED and next_restart_at is None)


def rediscover(ctx: HostContext) -> RediscoveryReport:
    report = RediscoveryReport()
    # Capacity first: re-reservations are checked against it.
    publish_heartbeat(ctx)
    manifest_ids = ctx.manifests.ids()
    tagged = {}
    for eid, proc in processes.find_tagged_processes().items():
        host = _engine_host(proc.pid)
        if host == ctx.host or (host is None and eid in manifest_ids):
            tagged[eid] = proc

    for eid, proc in tagged.items():
        rec = ctx.registry.find(eid)
        if rec is None:
            manifest = ctx.manifests.read(eid)
            if manifest is None:
                log.warning("tagged process %s (%s) has no manifest: left alone", proc.pid, eid)
                continue
            rec = manifest
            rec.pid, rec.process_create_time = proc.pid, proc.create_time
            ready = get_runtime(rec.spec.effective_runtime).probe(
                rec, ctx.http, ctx.settings.health_timeout_s
            )
            now = time.time()
            # Adoption re-creates the record in the state the process shows; it is
            # not a transition (there was no record to move).
            rec.state = S.RUNNING if ready.ready else S.STARTING
            rec.start_deadline = None if ready.ready else now + ctx.settings.start_timeout_s
            rec.state_changed_at = rec.updated_at = now
            rec.next_restart_at, rec.health_failures = None, 0
            rec.last_error = "re-adopted by rediscovery after the registry lost it"
            try:
                ctx.registry.create(rec)
            except ValueError:
                continue  # adopted concurrently
            lifecycle.ensure_reserved(ctx, rec)
            ctx.manifests.write(rec)
            report.adopted.append(eid)
            continue
        if rec.host != ctx.host:
            continue
        if _final(rec.state, rec.next_restart_at):
            lifecycle.kill_process(ctx, proc.pid, proc.create_time, eid)
            ctx.ledger.release(eid)
            ctx.manifests.remove(eid)
            report.stopped_orphans.append(eid)
            continue
        if rec.pid != proc.pid and not (
            rec.pid is not None and processes.is_alive(rec.pid, rec.process_create_time)
        ):
            # The record lost track of its process (e.g. a worker died between spawn
            # and writing the pid): adopt the process that carries its tag.
            def relink(r: EngineRecord, p: processes.TaggedProcess = proc) -> None:
                r.pid, r.process_create_time, r.next_restart_at = p.pid, p.create_time, None

            rec = ctx.registry.update(eid, relink)
            report.relinked.append(eid)
        if rec.state is S.LOST:
            lifecycle.reconcile_lost(ctx, rec)
        else:
            lifecycle.ensure_reserved(ctx, rec)

    for rec in ctx.registry.engines(host=ctx.host, state=LIVE_STATES | {S.LOST}):
        if rec.id in tagged or rec.state is S.PENDING or rec.next_restart_at is not None:
            continue
        if rec.pid is not None and processes.is_alive(rec.pid, rec.process_create_time):
            continue
        report.gone.append(rec.id)
        if rec.state is S.STOPPING or rec.pid is None:
            lifecycle.finalize_stop(ctx, rec.id)
        else:
            lifecycle.handle_dead(ctx, rec, "engine process gone (found by rediscovery)")

    for eid in ctx.ledger.reserved_engines():
        res = ctx.ledger.reservation(eid)
        if res is None or res.host != ctx.host or eid in tagged:
            continue
        rec = ctx.registry.find(eid)
        if rec is None or _final(rec.state, rec.next_restart_at):
            if ctx.ledger.release(eid):
                report.released.append(eid)
            ctx.manifests.remove(eid)
    for eid in ctx.manifests.ids() - set(tagged):
        rec = ctx.registry.find(eid)
        if rec is None or _final(rec.state, rec.next_restart_at):
            ctx.manifests.remove(eid)
    if any(report.to_dict().values()):
        log.info("rediscovery on %s: %s", ctx.host, report.to_dict())
    return report
