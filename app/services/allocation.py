"""Placement on live state, then an atomic reservation: ``allocate``.

``allocate`` runs ``app.core.allocation``'s placement on the hosts as the ledger sees
them now and reserves the result in the same write as the engine's record; the ledger
re-checks atomically. If another process took the room in between, the ledger refuses
and placement runs again on fresh state. ``models_on_hosts`` lists the models each
host's worker found on its disk, with the estimate at the default length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.core.allocation import Allocation, launch_flags, place_requirement, requirement
from app.core.errors import PlacementError, ReservationConflict, ValidationError
from app.core.memory import estimate_on_disk
from app.core.models import LIVE_STATES, EngineRecord
from app.core.placement import Placement, PlacementHost, PlacementPolicy, make_policy
from app.core.spec import EngineSpec
from app.state.ledger import Ledger, Reservation, ReserveRequest
from app.state.model_facts import hosts_model_facts
from app.state.registry import Registry


def placement_hosts(registry: Registry, ledger: Ledger) -> list[PlacementHost]:
    """Live hosts with their GPUs as the ledger sees them now (capacity + reservations),
    and the models on the disks of those that are up."""
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
                gpus=tuple(ledger.capacity(h.name)),
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
    hosts = placement_hosts(registry, ledger)
    need = requirement(spec, default_max_model_len=default_max_model_len, hosts=hosts)
    last: ReservationConflict | None = None
    for attempt in range(attempts):
        if attempt:
            hosts = placement_hosts(registry, ledger)
        chosen = place_requirement(need, hosts, policy, margin_mib)
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


def models_on_hosts(registry: Registry, *, default_max_model_len: int) -> list[dict[str, Any]]:
    """Each known host (up or not) with the models its worker found on its disk: their
    facts and what each would need at ``default_max_model_len`` (``estimate_on_disk``;
    ``estimate_error`` when the facts cannot size it)."""
    hosts = sorted(registry.hosts(), key=lambda h: h.name)
    facts = hosts_model_facts(registry.r, [h.name for h in hosts])
    out = []
    for h in hosts:
        models = []
        for key, f in sorted(facts.get(h.name, {}).items()):
            row: dict[str, Any] = {"model": key, "path": f.path, "facts": f}
            try:
                row["estimate"] = estimate_on_disk(f, default_max_model_len=default_max_model_len)
            except ValidationError as exc:
                row["estimate"], row["estimate_error"] = None, exc.message
            models.append(row)
        out.append({"host": h.name, "up": h.up, "models": models})
    return out
