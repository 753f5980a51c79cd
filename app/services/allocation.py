"""Placement on live state, then an atomic reservation: ``allocate``.

``allocate`` runs ``app.core.allocation``'s placement on the hosts as the ledger sees
them now and reserves the result in the same write as the engine's record; the ledger
re-checks atomically. If another process took the room in between, the ledger refuses
and placement runs again on fresh state.
"""

from __future__ import annotations

from collections.abc import Callable

from app.core.allocation import Allocation, launch_flags, requirement
from app.core.errors import PlacementError, ReservationConflict
from app.core.models import LIVE_STATES, EngineRecord
from app.core.placement import Placement, PlacementHost, PlacementPolicy, make_policy, place
from app.core.spec import EngineSpec
from app.state.ledger import Ledger, Reservation, ReserveRequest
from app.state.registry import Registry


def placement_hosts(registry: Registry, ledger: Ledger) -> list[PlacementHost]:
    """Live hosts with their GPUs as the ledger sees them now (capacity + reservations)."""
    engines_per_host: dict[str, int] = {}
    for rec in registry.engines(state=LIVE_STATES):
        if rec.host:
            engines_per_host[rec.host] = engines_per_host.get(rec.host, 0) + 1
    out = []
    for h in registry.hosts():
        out.append(
            PlacementHost(
                name=h.name,
                address=h.address,
                gpus=tuple(ledger.capacity(h.name)),
                port_range=h.port_range,
                ports_taken=frozenset(ledger.ports(h.name)) | frozenset(h.busy_ports),
                engine_count=engines_per_host.get(h.name, 0),
                up=h.up,
                inventory_gpus=len(h.gpus),
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
) -> tuple[Allocation, EngineRecord]:
    """Place ``spec`` on live state and reserve it for ``engine_id``, recording the
    placement in the engine's record in the same atomic step.

    With ``record``: create it (a new engine); else update the existing record
    (re-placement), applying ``mutate`` too. If another writer took the room between
    placement and reservation, the ledger refuses and placement runs again on fresh
    state. Raises ``PlacementError`` (nothing fits, with reasons) or
    ``ValidationError``; nothing is written then.
    """
    if isinstance(policy, str):
        policy = make_policy(policy)
    need = requirement(spec, default_max_model_len=default_max_model_len)
    last: ReservationConflict | None = None
    for _ in range(attempts):
        hosts = placement_hosts(registry, ledger)
        chosen = place(need.request, hosts, policy, margin_mib)
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
        )

        def place_into(r: EngineRecord, alloc: Allocation = alloc) -> None:
            alloc.place_record(r)
            if mutate is not None:
                mutate(r)

        try:
            if record is not None:
                place_into(record)
                rec = registry.create(record, reserve=req)
            else:
                rec = registry.update(engine_id, place_into, reserve=req)
        except ReservationConflict as exc:
            last = exc  # someone else took the room: place again on fresh state
            continue
        assert rec.port is not None
        placed = Placement(
            chosen.host, chosen.address, chosen.gpus, chosen.memory_mib_per_gpu, rec.port
        )
        reservation = Reservation(engine_id, chosen.host, rec.port, req.gpus)
        return Allocation(placed, need.estimate, alloc.launch, reservation), rec
    raise PlacementError(
        f"could not reserve room for {spec.name} after {attempts} attempts",
        [last.message] if last else [],
    )
