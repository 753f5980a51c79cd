"""From an engine spec to a placement and a reservation: estimate, place, reserve.

``plan`` is pure (a dry run). ``app.services.allocation.allocate`` runs the same
placement on live state and reserves the result in the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.core.memory import (
    MemoryEstimate,
    estimate_embedding_memory,
    estimate_memory,
    vllm_fit_flags,
)
from app.core.models import EngineRecord, GpuAssignment
from app.core.placement import (
    Placement,
    PlacementHost,
    PlacementPolicy,
    PlacementRequest,
    place,
)
from app.core.spec import EngineKind, EngineSpec


@dataclass(frozen=True)
class Requirement:
    request: PlacementRequest
    estimate: MemoryEstimate | None


@dataclass(frozen=True)
class Allocation:
    placement: Placement
    estimate: MemoryEstimate | None
    launch: dict[str, Any] = field(default_factory=dict)
    reservation: Any = None  # app.state.ledger.Reservation; None for a dry run

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
