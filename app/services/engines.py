"""Control-plane operations on engines: start (place + reserve + enqueue), stop, wait.

Called by the REST API and the tests; the host's worker does the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from app.core.allocation import Allocation, plan
from app.core.errors import IllegalTransition, NoWorkerError
from app.core.models import STOPPING_STATES, EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.services import on_demand
from app.services.cluster import (
    START_TASK_EXPIRES_S,
    Cluster,
    check_engine_spec,
    launch_engine,
    require_worker,
)
from app.state.allocation import placement_hosts
from app.state.events import encode_event
from app.state.queues import send_to_host
from app.state.registry import WAIT_REREAD_S, new_engine_id

S = EngineState


def plan_engine(cluster: Cluster, spec: EngineSpec, policy: str | None = None) -> Allocation:
    """Dry run: where ``spec`` would land now. Reserves nothing."""
    check_engine_spec(cluster, spec)
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
    check_engine_spec(cluster, spec)
    require_worker(cluster)
    engine_id = new_engine_id()
    record = EngineRecord(id=engine_id, spec=spec)
    return on_demand.place_and_reserve(cluster, engine_id, spec, policy=policy, record=record)


def discard_engine(cluster: Cluster, engine_id: str) -> None:
    """Undo ``reserve_engine`` for an engine that was never launched (record and
    reservation go in one step)."""
    cluster.registry.delete(engine_id)


def start_engine(cluster: Cluster, spec: EngineSpec, policy: str | None = None) -> EngineRecord:
    """Place and reserve ``spec``, record it PENDING, and queue its start on its host.
    An on-demand spec is recorded STANDBY instead (``app.services.on_demand``)."""
    if spec.on_demand:
        return on_demand.standby_engine(cluster, spec)
    return launch_engine(cluster, reserve_engine(cluster, spec, policy))


def stop_engine(
    cluster: Cluster,
    engine_id: str,
    *,
    drain: bool = True,
    drain_timeout_s: float | None = None,
) -> EngineRecord:
    """Ask the engine's host to stop it gracefully (STOPPING now, STOPPED when gone).

    With ``drain`` (the default) a serving engine (``EngineRecord.drainable``) is
    DRAINING first: the gateway sends it no new request (every gateway process hears of
    the write at once), and its host's worker waits until no request is in flight or
    ``drain_timeout_s`` (default ``SAGELLM_DRAIN_TIMEOUT_S``; 0: no drain) passed, then
    stops it. A stop without drain of a DRAINING engine stops it now.

    An engine with no process (FAILED, restart pending or not) is STOPPED at once: its
    pending restart is cancelled and its reservation released in the same atomic write.
    A stop is remembered in the record: if the host is down, it finishes when the
    host's worker comes back.
    """
    timeout = cluster.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
    drain = drain and timeout > 0
    deadline = time.time() + timeout
    before = cluster.registry.get(engine_id)
    on_its_way = drain and before.state in STOPPING_STATES
    if before.state is S.STOPPED or (on_its_way and not before.standby_after_stop):
        return before  # already on its way; a second stop changes nothing

    def begin(r: EngineRecord) -> None:
        # A stop a person asked for ends it for good, even one that an idle stop or an
        # eviction is draining already (that drain goes on, and ends in STOPPED).
        r.standby_after_stop = False
        if drain and r.state in STOPPING_STATES:
            return
        if drain and r.drainable:
            r.start_drain(deadline)
        else:
            r.request_stop()

    def draining_event(r: EngineRecord) -> list[str]:
        if r.state is not S.DRAINING:
            return []
        message = f"no new request; stops once none is in flight, in {timeout:g}s at most"
        return [encode_event("draining", message, deadline=deadline)]

    # the event is written by the same atomic step as the state change
    rec = cluster.registry.update(engine_id, begin, events=draining_event)
    if rec.state not in STOPPING_STATES or rec.host is None or before.state is S.STOPPING:
        return rec
    if drain and before.state is S.DRAINING:
        return rec  # its drain is under way (its worker watches it): only its end changed
    # DRAINING: its host's worker watches the drain (in a thread) and stops it after.
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
    """Wait until ``done`` holds or time runs out; the last record seen.

    Event-driven (``Registry.wait``: every record write is published); ``poll_s`` is
    only the safety re-read interval when nothing was heard."""
    return cluster.registry.wait(engine_id, done, timeout_s, reread_s=poll_s)


def wait_for_state(
    cluster: Cluster,
    engine_id: str,
    states: Iterable[EngineState],
    timeout_s: float,
    poll_s: float = WAIT_REREAD_S,
) -> EngineRecord:
    """Wait until the engine is in one of ``states`` (woken by each write of its
    record, no polling); returns the last record seen."""
    wanted = set(states)
    return _poll(cluster, engine_id, lambda r: r.state in wanted, timeout_s, poll_s)


def wait_until_settled(
    cluster: Cluster, engine_id: str, timeout_s: float, poll_s: float = WAIT_REREAD_S
) -> EngineRecord:
    """Wait until the engine's start has an outcome (``EngineRecord.settled``) or time
    runs out (woken by each write of its record, no polling)."""
    return _poll(cluster, engine_id, lambda r: r.settled, timeout_s, poll_s)


def restart_engine(cluster: Cluster, engine_id: str) -> EngineRecord:
    """Restart an engine in place (same id). A FAILED engine is placed again first."""
    rec = cluster.registry.get(engine_id)
    if rec.stopped_or_stopping:
        raise IllegalTransition(f"engine {engine_id} is {rec.state.value}: start a new one instead")
    if rec.state is S.STANDBY:
        return on_demand.wake_engine(cluster, engine_id)  # start it now, as a request would
    check_engine_spec(cluster, rec.spec)  # the settings may have changed since its start
    if rec.owns_nothing:  # FAILED for good (STOPPED was refused above)
        # Its reservation was released when it failed: place and reserve again, in
        # the same atomic write as the new placement and the pending restart.
        require_worker(cluster)
        rec = on_demand.place_and_reserve(
            cluster, engine_id, rec.spec, mutate=EngineRecord.retry_failed
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
