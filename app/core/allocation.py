"""From an engine spec to a placement and a reservation: estimate, place, reserve.

``plan`` is pure (a dry run). ``app.state.allocation.allocate`` runs the same
placement on live state and reserves the result in the ledger.

The estimate is arithmetic over the model's facts as measured by the hosts that have
its files (``PlacementHost.models``); where the files are also decides where it may
run (see ``requirement`` and ``place_requirement``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from app.core.errors import PlacementError
from app.core.memory import (
    MemoryEstimate,
    ModelFacts,
    estimate_embedding_memory,
    estimate_memory,
    find_facts,
    is_path_like,
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
    # Up hosts that have the model's files; a local path may run only there.
    holders: frozenset[str] = frozenset()
    files_required: bool = False


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


NO_HOST_HAS_FILES = "no host has its files on disk"


def model_holders(spec: EngineSpec, hosts: Sequence[PlacementHost]) -> dict[str, ModelFacts]:
    """Facts of ``spec``'s model by host, from the up hosts that have its files (the
    facts of a DOWN host are not used)."""
    embedding = spec.kind is EngineKind.EMBEDDING
    out = {}
    for host in hosts:
        facts = find_facts(host.models, spec.model, embedding=embedding) if host.up else None
        if facts is not None:
            out[host.name] = facts
    return out


def requirement(
    spec: EngineSpec,
    *,
    default_max_model_len: int = 32768,
    hosts: Sequence[PlacementHost] = (),
) -> Requirement:
    """What ``spec`` needs: GPU count and MiB per GPU (estimated unless given), and the
    hosts that have its model's files.

    The estimate is made from the facts of each host that has the files, and the
    largest wins (hosts with different snapshots of a model: the reservation fits any
    of them); its note names the hosts. When no up host has them, the estimate comes
    from the model's name, and its note says so.
    """
    spec.validate()
    holders = model_holders(spec, hosts)
    estimate: MemoryEstimate | None = None
    memory = 0
    if spec.wants_gpu:
        estimate = _estimate(spec, holders, default_max_model_len)
        memory = estimate.per_gpu_mib
    request = PlacementRequest(
        gpu_count=spec.gpu_count,
        memory_mib_per_gpu=memory,
        host=spec.host,
        gpu_ids=spec.gpu_ids,
        port=spec.port,
        label=spec.label or spec.name,
    )
    return Requirement(
        request, estimate, frozenset(holders), files_required=is_path_like(spec.model)
    )


def _estimate(
    spec: EngineSpec, holders: Mapping[str, ModelFacts], default_max_model_len: int
) -> MemoryEstimate:
    def one(facts: ModelFacts | None) -> MemoryEstimate:
        if spec.kind is EngineKind.LLM:
            return estimate_memory(
                spec.model,
                facts=facts,
                dtype=spec.dtype,
                quantization=spec.quantization,
                tensor_parallel=spec.tensor_parallel,
                pipeline_parallel=spec.pipeline_parallel,
                max_model_len=spec.max_model_len,
                required_memory_gb=spec.required_memory_gb,
                default_max_model_len=default_max_model_len,
            )
        return estimate_embedding_memory(
            spec.model, facts=facts, required_memory_gb=spec.required_memory_gb
        )

    if not holders:
        estimate = one(None)
        return replace(estimate, note=NO_HOST_HAS_FILES) if estimate.source == "name" else estimate
    by_host = {name: one(facts) for name, facts in sorted(holders.items())}
    top = max(by_host.values(), key=lambda e: e.per_gpu_mib)
    if top.source not in ("safetensors", "config"):
        return top
    names = [name for name, e in by_host.items() if e == top]
    return replace(top, note=f"measured on host {', '.join(names)}")


def place_requirement(
    need: Requirement,
    hosts: Sequence[PlacementHost],
    policy: PlacementPolicy | str,
    margin_mib: int,
) -> Placement:
    """Where ``need`` runs, by where its model's files are:

    * a local path runs only on a host that has it (when some up host has it; when
      none does, anywhere, as before facts: the engine then fails on a host without it);
    * a Hugging Face repo id runs on a host that has it in its cache when one of those
      fits, else on any host (which downloads it at start).
    """
    if need.holders:
        have = ", ".join(sorted(need.holders))
        reason = f"does not have {need.request.label}'s model files (host {have} has them)"
        only = replace(need.request, only_hosts=need.holders, only_hosts_reason=reason)
        try:
            return place(only, hosts, policy, margin_mib)
        except PlacementError:
            if need.files_required:
                raise
    return place(need.request, hosts, policy, margin_mib)


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
    need = requirement(spec, default_max_model_len=default_max_model_len, hosts=hosts)
    chosen = place_requirement(need, hosts, policy, margin_mib)
    return Allocation(chosen, need.estimate, launch_flags(spec, need, chosen))
