"""From an engine spec to a placement and a reservation: estimate, place, reserve.

``plan`` is pure (a dry run); ``allocate`` runs the same placement on live state and
then reserves the result in the ledger, which re-checks atomically. If another
process took the room in between, the ledger refuses and placement runs again on
fresh state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import PlacementError, ReservationConflict
from app.core.memory import (
    MemoryEstimate,
    estimate_embedding_memory,
    estimate_memory,
    vllm_fit_flags,
)
from app.core.models import LIVE_STATES, EngineKind, EngineRecord, EngineSpec, GpuAssignment
from app.core.placement import (
    Placement,
    PlacementHost,
    PlacementPolicy,
    PlacementRequest,
    make_policy,
    place,
)
from app.core.state.ledger import Ledger, Reservation, ReserveRequest
from app.core.state.registry import Registry


@dataclass(frozen=True)
class Requirement:
    request: PlacementRequest
    estimate: MemoryEstimate | None


@dataclass(frozen=True)
class Allocation:
    placement: Placement
    estimate: MemoryEstimate | None
    launch: dict[str, Any] = field(default_factory=dict)
    reservation: Reservation | None = None  # None for a dry run

    def place_record(self, r: EngineRecord) -> None:
        """Copy this placement (host, address, port, GPUs, launch flags) into a record."""
        p = self.placement
        r.host, r.address, r.port = p.host, p.address, p.port
        r.gpus = self.gpus
        r.memory_per_gpu_mib = p.memory_mib_per_gpu
        r.launch = dict(self.launch)

    @property
    def gpus(self) -> list[GpuAssignment]:
        return [
            GpuAssignment(g.index, g.uuid, self.placement.memory_mib_per_gpu)
            for g in self.placement.gpus
        ]

    def to_dict(self) -> dict[str, Any]:
        p = self.placement
        return {
            "host": p.host,
            "address": p.address,
            "port": p.port,
            "gpus": [{"index": g.index, "uuid": g.uuid} for g in p.gpus],
            "memory_per_gpu_mib": p.memory_mib_per_gpu,
            "estimate": self.estimate.explain() if self.estimate else None,
            "launch": dict(self.launch),
        }


def requirement(spec: EngineSpec, *, default_max_model_len: int = 32768) -> Requirement:
    """What ``spec`` needs: GPU count and MiB per GPU (estimated unless given)."""
    spec.validate()
    estimate: MemoryEstimate | None = None
    memory = 0
    if spec.wants_gpu:
        if spec.kind is EngineKind.LLM:
            estimate = estimate_memory(
                spec.model,
                dtype=spec.dtype,
                quantization=spec.quantization,
                tensor_parallel=spec.tensor_parallel,
                pipeline_parallel=spec.pipeline_parallel,
                max_model_len=spec.max_model_len,
                required_memory_gb=spec.required_memory_gb,
                default_max_model_len=default_max_model_len,
            )
        else:
            estimate = estimate_embedding_memory(
                spec.model, required_memory_gb=spec.required_memory_gb
            )
        memory = estimate.per_gpu_mib
    request = PlacementRequest(
        gpu_count=spec.gpu_count,
        memory_mib_per_gpu=memory,
        host=spec.host,
        gpu_ids=spec.gpu_ids,
        port=spec.port,
        label=spec.label or spec.name,
    )
    return Requirement(request, estimate)


def launch_flags(spec: EngineSpec, need: Requirement, placement: Placement) -> dict[str, Any]:
    """Runtime flags that make the engine fit its reservation (vLLM only needs them)."""
    if spec.effective_runtime != "vllm" or not placement.gpus or need.estimate is None:
        return {"max_model_len": spec.max_model_len} if spec.max_model_len else {}
    total = min(g.total_mib for g in placement.gpus)
    fit = vllm_fit_flags(need.estimate, placement.memory_mib_per_gpu, total)
    flags: dict[str, Any] = {"gpu_memory_utilization": fit.gpu_memory_utilization}
    max_len = spec.max_model_len or fit.max_model_len
    if max_len:
        flags["max_model_len"] = max_len
    return flags


def plan(
    spec: EngineSpec,
    hosts: Sequence[PlacementHost],
    *,
    policy: PlacementPolicy | str,
    margin_mib: int,
    default_max_model_len: int = 32768,
) -> Allocation:
    """Where ``spec`` would run on ``hosts``; reserves nothing (a dry run)."""
    need = requirement(spec, default_max_model_len=default_max_model_len)
    chosen = place(need.request, hosts, policy, margin_mib)
    return Allocation(chosen, need.estimate, launch_flags(spec, need, chosen))


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
