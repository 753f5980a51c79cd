"""Placement on live state, then an atomic reservation: ``allocate``.

``allocate`` runs ``app.core.allocation``'s placement on the hosts as the ledger sees
them now and reserves the result in the same write as the engine's record; the ledger
re-checks atomically. If another process took the room in between, the ledger refuses
and placement runs again on fresh state.

It lives in ``app.state`` (not ``app.services``) because a host's worker re-places an
engine too (``workers.agent.remedy``: a GPU that had no room at start), and workers
import only ``app.core``, ``app.state`` and ``app.settings``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from app.core.allocation import Allocation, launch_flags, place_requirement, requirement
from app.core.errors import PlacementError, ReservationConflict
from app.core.eviction import Candidate, EvictionPlan, plan_eviction
from app.core.models import LIVE_STATES, EngineRecord, EngineState
from app.core.placement import Placement, PlacementHost, PlacementPolicy, make_policy
from app.core.spec import EngineSpec
from app.state.events import encode_event
from app.state.ledger import PORT_MARK, Ledger, Reservation, ReserveRequest
from app.state.model_facts import hosts_model_facts
from app.state.registry import Registry

# What may be evicted, and why the other on-demand engines may not.
Evictable = tuple[list[Candidate], list[str]]


def placement_hosts(
    registry: Registry, ledger: Ledger, *, exclude_gpus: Collection[str] = ()
) -> list[PlacementHost]:
    """Live hosts with their GPUs as the ledger sees them now (capacity + reservations),
    and the models on the disks of those that are up. GPUs whose uuid is in
    ``exclude_gpus`` are left out (one that had no room for an engine at its start)."""
    engines_per_host: dict[str, int] = {}
    for rec in registry.engines(state=LIVE_STATES):
        if rec.host:
            engines_per_host[rec.host] = engines_per_host.get(rec.host, 0) + 1
    hosts = registry.hosts()
    models = hosts_model_facts(registry.r, [h.name for h in hosts if h.up])
    out = []
    for h in hosts:
        out.append(
            PlacementHost(
                name=h.name,
                address=h.address,
                gpus=tuple(g for g in ledger.capacity(h.name) if g.uuid not in exclude_gpus),
                port_range=h.port_range,
                ports_taken=frozenset(ledger.ports(h.name)) | frozenset(h.busy_ports),
                engine_count=engines_per_host.get(h.name, 0),
                up=h.up,
                inventory_gpus=len(h.gpus),
                models=models.get(h.name, {}),
            )
        )
    return out


def allocate(
    engine_id: str,
    spec: EngineSpec,
    registry: Registry,
    ledger: Ledger,
    *,
    policy: PlacementPolicy | str,
    margin_mib: int,
    default_max_model_len: int = 32768,
    record: EngineRecord | None = None,
    mutate: Callable[[EngineRecord], None] | None = None,
    attempts: int = 8,
    exclude_gpus: Collection[str] = (),
    move: bool = False,
    evictable: Callable[[], Evictable] | None = None,
    drain_timeout_s: float = 30.0,
) -> tuple[Allocation, EngineRecord]:
    """Place ``spec`` on live state and reserve it for ``engine_id``, recording the
    placement in the engine's record in the same atomic step.

    With ``record``: create it (a new engine); else update the existing record
    (re-placement), applying ``mutate`` too. If another writer took the room between
    placement and reservation, the ledger refuses and placement runs again on fresh
    state. ``exclude_gpus``: GPU uuids not to place on. ``move``: the engine holds a
    reservation already, given up in the same atomic write that takes the new one.
    ``evictable``: when nothing fits, the idle on-demand engines that may make room
    (``app.core.eviction``): the fewest of them are drained back to STANDBY and their
    room handed to this engine in the same atomic write (it spawns once their processes
    are gone: ``EngineRecord.waits_for``).
    Raises ``PlacementError`` (nothing fits, with reasons) or ``ValidationError``;
    nothing is written then.
    """
    if isinstance(policy, str):
        policy = make_policy(policy)
    hosts = placement_hosts(registry, ledger, exclude_gpus=exclude_gpus)
    need = requirement(spec, default_max_model_len=default_max_model_len, hosts=hosts)
    last: ReservationConflict | None = None
    for attempt in range(attempts):
        if attempt:
            hosts = placement_hosts(registry, ledger, exclude_gpus=exclude_gpus)
        victims: tuple[str, ...] = ()
        try:
            chosen = place_requirement(need, hosts, policy, margin_mib)
        except PlacementError as exc:
            evicting = _plan_eviction(exc, need, hosts, evictable, policy, margin_mib)
            chosen, victims = evicting.placement, evicting.victims
        host = next(h for h in hosts if h.name == chosen.host)
        alloc = Allocation(chosen, need.estimate, launch_flags(spec, need, chosen))
        req = ReserveRequest(
            chosen.host,
            tuple((g.uuid, chosen.memory_mib_per_gpu) for g in chosen.gpus),
            port_range=host.port_range,
            margin_mib=margin_mib,
            port=spec.port,
            # Ports placement saw busy: the heartbeat's outside listeners, not ledger.
            avoid_ports=tuple(host.ports_taken),
            move=move,
        )
        placed = _placed_event(chosen, spec.port)

        def place_into(
            r: EngineRecord, alloc: Allocation = alloc, victims: tuple[str, ...] = victims
        ) -> None:
            alloc.place_record(r)
            r.waits_for = list(victims)
            if mutate is not None:
                mutate(r)

        evict = [_evicted(v, engine_id, time.time() + drain_timeout_s) for v in victims]

        try:
            if record is not None:
                place_into(record)
                rec = registry.create(record, reserve=req, events=[placed], evict=evict)
            else:
                rec = registry.update(
                    engine_id, place_into, reserve=req, events=[placed], evict=evict
                )
        except ReservationConflict as exc:
            last = exc  # someone else took the room: place again on fresh state
            continue
        assert rec.port is not None
        final = Placement(
            chosen.host, chosen.address, chosen.gpus, chosen.memory_mib_per_gpu, rec.port
        )
        reservation = Reservation(engine_id, chosen.host, rec.port, req.gpus)
        return Allocation(final, need.estimate, alloc.launch, reservation), rec
    raise PlacementError(
        f"could not reserve room for {spec.name} after {attempts} attempts",
        [last.message] if last else [],
    )


def _placed_event(chosen: Placement, port: int | None) -> str:
    """The timeline's "placed" event, written with the reservation (the port the
    reservation picks replaces ``PORT_MARK`` in the same step)."""
    final = Placement(
        chosen.host, chosen.address, chosen.gpus, chosen.memory_mib_per_gpu, port or 0
    )
    message = "placed on " + final.describe()
    if not port:
        message = message.replace("port 0", f"port {PORT_MARK}")
    return encode_event(
        "placed",
        message,
        host=chosen.host,
        gpus=[g.index for g in chosen.gpus],
        gpu_uuids=[g.uuid for g in chosen.gpus],
        memory_mib_per_gpu=chosen.memory_mib_per_gpu,
        port=port or PORT_MARK,
    )


def _plan_eviction(
    refused: PlacementError,
    need: Any,
    hosts: Sequence[PlacementHost],
    evictable: Callable[[], Evictable] | None,
    policy: PlacementPolicy,
    margin_mib: int,
) -> EvictionPlan:
    """Where ``need`` fits once idle on-demand engines give their room back, or the
    placement's refusal, saying why eviction did not help when it was worth trying."""
    if evictable is None:
        raise refused
    candidates, busy = evictable()
    found = plan_eviction(need, hosts, candidates, policy, margin_mib) if candidates else None
    if found is None:
        why = list(busy)
        if candidates:
            why.append(
                f"evicting the {len(candidates)} idle on-demand engine(s) would not make room"
            )
        if not why:
            raise refused
        raise PlacementError(refused.summary, [*refused.reasons, *why]) from None
    return found


def _evicted(
    victim: str, engine_id: str, deadline: float
) -> tuple[str, Callable[[EngineRecord], None], tuple[str, ...]]:
    event = encode_event("evicted", f"room handed to {engine_id}; back to STANDBY", to=engine_id)
    return victim, lambda r: r.evict_for(engine_id, deadline), (event,)


def eviction_candidates(registry: Registry, busy: Callable[[], Collection[str]]) -> Evictable:
    """Engines that may be evicted to make room: on demand, not pinned to GPUs,
    RUNNING, and with no request in flight (``busy``: engine ids with requests in
    flight through any gateway process); and why the other on-demand engines may not."""
    in_flight = set(busy())
    out = []
    kept: list[str] = []
    for rec in registry.engines(state=EngineState.RUNNING):
        spec = rec.spec
        if not spec.on_demand or rec.host is None or rec.evicted_for is not None:
            continue
        if spec.gpu_ids is not None:
            kept.append(f"on-demand engine {rec.id} ({spec.name}) is pinned to its GPUs")
            continue
        if rec.id in in_flight:
            kept.append(
                f"on-demand engine {rec.id} ({spec.name}) on host {rec.host} has requests "
                "in flight: not evicted"
            )
            continue
        out.append(
            Candidate(
                rec.id,
                rec.host,
                tuple((g.uuid, g.memory_mib) for g in rec.gpus),
                rec.last_request_at or rec.running_since or rec.created_at,
            )
        )
    return out, kept
