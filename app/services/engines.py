"""Control-plane operations on engines: start (place + reserve + enqueue), stop, wait.

Called by the REST API and the tests; the host's worker does the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from celery import Celery

from app.core.allocation import Allocation, plan
from app.core.engine_policy import EnginePolicy
from app.core.errors import IllegalTransition, NoWorkerError
from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.services.allocation import allocate, placement_hosts
from app.settings import Settings
from app.state.client import connect
from app.state.ledger import Ledger
from app.state.registry import Registry, new_engine_id

S = EngineState
START_TASK_EXPIRES_S = 60.0


@dataclass
class Cluster:
    settings: Settings
    registry: Registry
    ledger: Ledger
    celery: Celery


def connect_cluster(settings: Settings, celery: Celery | None = None) -> Cluster:
    if celery is None:
        from workers.celery_app import make_celery

        celery = make_celery(settings)
    client = connect(settings.redis_url)
    return Cluster(settings, Registry(client), Ledger(client), celery)


def _require_worker(cluster: Cluster) -> None:
    if not any(h.up for h in cluster.registry.hosts()):
        raise NoWorkerError(
            "no host worker is alive: start one with `flask sagellm worker` "
            "(or `make up` on a single machine)"
        )


def check_engine_spec(cluster: Cluster, spec: EngineSpec) -> None:
    """The engine policy at the edge (``app.core.engine_policy``: env, flags, model
    roots, unsafe flags per the settings), with the flags ``spec``'s runtime owns.
    ``ValidationError`` naming the field; called before anything is reserved or queued.
    """
    from workers.runtimes import get_runtime

    get_runtime(spec.effective_runtime).validate(spec, EnginePolicy.from_settings(cluster.settings))


def plan_engine(cluster: Cluster, spec: EngineSpec, policy: str | None = None) -> Allocation:
    """Dry run: where ``spec`` would land now. Reserves nothing."""
    check_engine_spec(cluster, spec.validate())
    hosts = placement_hosts(cluster.registry, cluster.ledger)
    return plan(
        spec,
        hosts,
        policy=policy or cluster.settings.placement_policy,
        margin_mib=cluster.settings.gpu_safety_margin_mib,
        default_max_model_len=cluster.settings.default_max_model_len,
    )


def reserve_engine(cluster: Cluster, spec: EngineSpec, policy: str | None = None) -> EngineRecord:
    """Place and reserve ``spec``; record it PENDING with its placement. Starts nothing.

    The record and its reservation are written in one atomic step: on any error
    nothing is left behind, neither a record nor a reservation.
    """
    check_engine_spec(cluster, spec.validate())
    _require_worker(cluster)
    engine_id = new_engine_id()
    _, rec = allocate(
        engine_id,
        spec,
        cluster.registry,
        cluster.ledger,
        policy=policy or cluster.settings.placement_policy,
        margin_mib=cluster.settings.gpu_safety_margin_mib,
        default_max_model_len=cluster.settings.default_max_model_len,
        record=EngineRecord(id=engine_id, spec=spec),
    )
    return rec


def launch_engine(cluster: Cluster, rec: EngineRecord) -> EngineRecord:
    """Queue the start of a reserved (PENDING) engine on its host."""
    from app.state.queues import send_to_host

    assert rec.host is not None
    task_id = send_to_host(
        cluster.celery,
        rec.host,
        "sagellm.start_engine",
        (rec.id,),
        expires_s=START_TASK_EXPIRES_S,
    )
    return cluster.registry.update(rec.id, lambda r: setattr(r, "task_id", task_id))


def discard_engine(cluster: Cluster, engine_id: str) -> None:
    """Undo ``reserve_engine`` for an engine that was never launched (record and
    reservation go in one step)."""
    cluster.registry.delete(engine_id)


def start_engine(cluster: Cluster, spec: EngineSpec, policy: str | None = None) -> EngineRecord:
    """Place and reserve ``spec``, record it PENDING, and queue its start on its host."""
    return launch_engine(cluster, reserve_engine(cluster, spec, policy))


def stop_engine(cluster: Cluster, engine_id: str) -> EngineRecord:
    """Ask the engine's host to stop it gracefully (STOPPING now, STOPPED when gone).

    An engine with no process (FAILED, restart pending or not) is STOPPED at once: its
    pending restart is cancelled and its reservation released in the same atomic write.
    A stop is remembered in the record: if the host is down, it finishes when the
    host's worker comes back.
    """

    before = cluster.registry.get(engine_id)
    if before.state is S.STOPPED:
        return before
    rec = cluster.registry.update(engine_id, EngineRecord.request_stop)
    if rec.state is not S.STOPPING or rec.host is None or before.state is S.STOPPING:
        return rec
    from app.state.queues import send_to_host

    send_to_host(
        cluster.celery,
        rec.host,
        "sagellm.stop_engine",
        (engine_id,),
        expires_s=START_TASK_EXPIRES_S,
    )
    return rec


def _poll(
    cluster: Cluster,
    engine_id: str,
    done: Callable[[EngineRecord], bool],
    timeout_s: float,
    poll_s: float,
) -> EngineRecord:
    """Re-read the record until ``done`` holds or time runs out; the last record seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        rec = cluster.registry.get(engine_id)
        if done(rec) or time.monotonic() >= deadline:
            return rec
        time.sleep(poll_s)


def wait_for_state(
    cluster: Cluster,
    engine_id: str,
    states: Iterable[EngineState],
    timeout_s: float,
    poll_s: float = 0.2,
) -> EngineRecord:
    """Poll until the engine is in one of ``states``; returns the last record seen."""
    wanted = set(states)
    return _poll(cluster, engine_id, lambda r: r.state in wanted, timeout_s, poll_s)


def settled(rec: EngineRecord) -> bool:
    """RUNNING, STOPPED, or FAILED with no restart pending: a start has an outcome."""
    return rec.state in (S.RUNNING, S.STOPPED) or (
        rec.state is S.FAILED and rec.next_restart_at is None
    )


def wait_until_settled(
    cluster: Cluster, engine_id: str, timeout_s: float, poll_s: float = 0.2
) -> EngineRecord:
    """Poll until the engine's start has an outcome (see ``settled``) or time runs out."""
    return _poll(cluster, engine_id, settled, timeout_s, poll_s)


def restart_engine(cluster: Cluster, engine_id: str) -> EngineRecord:
    """Restart an engine in place (same id). A FAILED engine is placed again first."""
    from app.state.queues import send_to_host

    rec = cluster.registry.get(engine_id)
    if rec.state in (S.STOPPING, S.STOPPED):
        raise IllegalTransition(f"engine {engine_id} is {rec.state.value}: start a new one instead")
    check_engine_spec(cluster, rec.spec)  # the settings may have changed since its start
    if rec.state is S.FAILED and rec.next_restart_at is None:
        # Its reservation was released when it failed: place and reserve again, in
        # the same atomic write as the new placement and the pending restart.
        _require_worker(cluster)

        def due_now(r: EngineRecord) -> None:
            if not r.owns_nothing or r.state is not S.FAILED:
                raise IllegalTransition(f"engine {engine_id} changed: {r.state.value}")
            r.restart_count = 0
            r.next_restart_at = time.time()

        _, rec = allocate(
            engine_id,
            rec.spec,
            cluster.registry,
            cluster.ledger,
            policy=cluster.settings.placement_policy,
            margin_mib=cluster.settings.gpu_safety_margin_mib,
            default_max_model_len=cluster.settings.default_max_model_len,
            mutate=due_now,
        )
    if rec.host is None:
        raise IllegalTransition(f"engine {engine_id} has no host yet")
    host = cluster.registry.host(rec.host)
    if host is None or not host.up:
        raise NoWorkerError(f"host {rec.host} of engine {engine_id} is down")
    task_id = send_to_host(
        cluster.celery,
        rec.host,
        "sagellm.restart_engine_now",
        (engine_id,),
        expires_s=START_TASK_EXPIRES_S,
    )
    return cluster.registry.update(engine_id, lambda r: setattr(r, "task_id", task_id))


def engine_logs(cluster: Cluster, engine_id: str, tail: int, timeout_s: float = 15) -> list[str]:
    """The last lines of an engine's log, read by its host's worker (logs stay on hosts)."""
    from app.state.queues import send_to_host

    rec = cluster.registry.get(engine_id)
    if rec.host is None:
        return []
    host = cluster.registry.host(rec.host)
    if host is None or not host.up:
        raise NoWorkerError(f"host {rec.host} is down: its logs cannot be read now")
    task_id = send_to_host(
        cluster.celery, rec.host, "sagellm.read_log", (engine_id, tail), expires_s=timeout_s
    )
    result = cluster.celery.AsyncResult(task_id)
    try:
        lines = result.get(timeout=timeout_s)
    except Exception as exc:
        raise NoWorkerError(f"host {rec.host} did not return the log: {exc}") from None
    finally:
        result.forget()
    return [str(x) for x in lines]


def prune_records(registry: Registry, ledger: Ledger, older_than_s: float) -> list[str]:
    """Delete STOPPED/FAILED records older than ``older_than_s``; whatever they still
    hold is released in the same atomic step. Reservations no record owns any more
    (left by a crash of an older version) are released too."""
    cutoff = time.time() - older_than_s

    def prunable(rec: EngineRecord) -> bool:
        return rec.owns_nothing and rec.state_changed_at <= cutoff

    pruned = [
        rec.id
        for rec in registry.engines(state=[S.STOPPED, S.FAILED])
        if prunable(rec) and registry.delete(rec.id, only_if=prunable)
    ]
    for eid in ledger.reserved_engines():
        rec = registry.find(eid)
        if rec is None or rec.owns_nothing:
            ledger.release(eid)
    return pruned


def forget_host(cluster: Cluster, name: str) -> list[str]:
    """Forget a DOWN host for good (decommissioned, or gone for days): its engines end
    FAILED (STOPPING ones STOPPED), their reservations are released, the host and its
    GPU capacity leave the cluster. Returns the engines it ended. A live host is
    refused: stop its worker first."""
    from app.core.errors import NotFoundError

    host = cluster.registry.host(name)
    if host is None:
        raise NotFoundError(f"host {name!r} is not known")
    if host.up:
        raise IllegalTransition(
            f"host {name} is up (heartbeat {host.heartbeat_age_s:.0f}s ago): stop its worker "
            "before forgetting it"
        )
    ended = []
    for rec in cluster.registry.engines(host=name):
        if rec.owns_nothing:
            cluster.ledger.release(rec.id)  # holds nothing; make sure of it
            continue

        def end(r: EngineRecord) -> None:
            if r.state is S.STOPPING:
                r.transition(S.STOPPED)
            elif r.state is not S.STOPPED:
                if r.state is S.RUNNING:
                    r.transition(S.UNHEALTHY)
                if r.state is not S.FAILED:
                    r.transition(S.FAILED)
                r.last_error = f"host {name} was forgotten"
            r.next_restart_at = None  # owns nothing now: released in this same write
            r.pid = r.process_create_time = None

        cluster.registry.update(rec.id, end)
        ended.append(rec.id)
    cluster.ledger.forget_host(name)
    cluster.registry.forget_host(name)
    return ended
