"""On-demand engines: recorded STANDBY, started by the first request, evicted when idle.

* ``standby_engine``: a spec with ``on_demand`` is admitted like any start (and must
  fit the cluster when it is empty, so a cold start can ever succeed), then recorded
  STANDBY: nothing reserved, no task sent.
* ``wake_engine``: a cold start. ``STANDBY -> PENDING`` is written in the same atomic
  step as its placement and reservation (``EngineRecord.wake`` refuses any other
  state), so of any number of concurrent wakers, through any number of gateway
  processes, exactly one starts it; the others wait for the same engine.
* ``evictable``: the idle on-demand engines a start may hand back to STANDBY to make
  room (``app.state.allocation.eviction_candidates``), unless ``SAGELLM_EVICTION=0``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from app.core.allocation import plan
from app.core.errors import IllegalTransition, PlacementError, ValidationError
from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.services.cluster import Cluster, check_engine_spec, launch_engine, require_worker
from app.state.allocation import Evictable, allocate, eviction_candidates, placement_hosts
from app.state.on_demand_counters import OnDemandCounters
from app.state.registry import new_engine_id


def evictable(cluster: Cluster) -> Callable[[], Evictable] | None:
    """The eviction candidates of a start on ``cluster`` (None: eviction is off)."""
    if not cluster.settings.eviction:
        return None

    return lambda: eviction_candidates(cluster.registry, cluster.gateway_reports.busy)


def place_and_reserve(
    cluster: Cluster,
    engine_id: str,
    spec: EngineSpec,
    *,
    policy: str | None = None,
    record: EngineRecord | None = None,
    mutate: Callable[[EngineRecord], None] | None = None,
    evict: bool = True,
) -> EngineRecord:
    """``app.state.allocation.allocate`` with the cluster's settings: placement and the
    reservation in the record's atomic write, evicting idle on-demand engines when
    nothing fits (``evict``, unless ``SAGELLM_EVICTION=0``); evictions are counted."""
    _, rec = allocate(
        engine_id,
        spec,
        cluster.registry,
        cluster.ledger,
        policy=policy or cluster.settings.placement_policy,
        margin_mib=cluster.settings.gpu_safety_margin_mib,
        default_max_model_len=cluster.settings.default_max_model_len,
        record=record,
        mutate=mutate,
        evictable=evictable(cluster) if evict else None,
        drain_timeout_s=cluster.settings.drain_timeout_s,
    )
    if rec.waits_for:
        OnDemandCounters(cluster.registry.r).add(OnDemandCounters.EVICTIONS, len(rec.waits_for))
    return rec


def check_could_fit(cluster: Cluster, spec: EngineSpec) -> None:
    """An on-demand engine must fit the cluster when nothing else runs (else a cold
    start could never succeed): ``ValidationError`` naming the reason per GPU."""
    hosts = placement_hosts(cluster.registry, cluster.ledger)
    empty = [
        dataclasses.replace(
            h,
            up=True,
            gpus=tuple(dataclasses.replace(g, reserved_mib=0, outside_mib=0) for g in h.gpus),
            ports_taken=frozenset(),
        )
        for h in hosts
    ]
    if not empty:
        return  # no host known yet: the cold start will say why
    try:
        plan(
            spec,
            empty,
            policy=cluster.settings.placement_policy,
            margin_mib=cluster.settings.gpu_safety_margin_mib,
            default_max_model_len=cluster.settings.default_max_model_len,
        )
    except PlacementError as exc:
        field = "gpu_ids" if spec.gpu_ids is not None else "required_memory_gb"
        raise ValidationError(
            f"on_demand: {spec.name} would not fit even on an idle cluster: "
            + "; ".join(exc.reasons or [exc.summary]),
            field=field,
        ) from None


def standby_engine(cluster: Cluster, spec: EngineSpec) -> EngineRecord:
    """Record an on-demand engine STANDBY (admitted first): nothing reserved or started."""
    check_engine_spec(cluster, spec)
    check_could_fit(cluster, spec)
    rec = EngineRecord(id=new_engine_id(), spec=spec, state=EngineState.STANDBY)
    return cluster.registry.create(rec)


def wake_engine(cluster: Cluster, engine_id: str) -> EngineRecord:
    """Cold start: place and reserve a STANDBY engine (evicting idle on-demand engines
    when nothing fits) and queue its start. ``IllegalTransition`` when it is not
    STANDBY any more (another request woke it: wait for that start instead);
    ``PlacementError`` (with reasons) when it cannot fit now."""
    rec = cluster.registry.get(engine_id)
    if rec.state is not EngineState.STANDBY:
        raise IllegalTransition(f"engine {engine_id} is {rec.state.value}, not STANDBY")
    require_worker(cluster)
    now = time.time()
    rec = place_and_reserve(cluster, engine_id, rec.spec, mutate=lambda r: r.wake(now))
    OnDemandCounters(cluster.registry.r).add(OnDemandCounters.COLD_STARTS)
    return launch_engine(cluster, rec)
