"""Cluster status views, pure: hosts, GPUs, engines and reservations as plain dicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.core.models import EngineRecord, EngineState, GpuCapacity, HostRecord, mib_to_gb
from app.core.spec import EngineKind


def gpu_rows(
    hosts: Sequence[HostRecord], capacity: dict[str, list[GpuCapacity]], margin_mib: int
) -> list[dict[str, Any]]:
    """One row per GPU of every known host: total, outside-held, reserved, available."""
    rows = []
    for h in hosts:
        by_uuid = {g.uuid: g for g in capacity.get(h.name, [])}
        for gpu in h.gpus:
            cap = by_uuid.get(gpu.uuid)
            outside = cap.outside_mib if cap else gpu.used_mib
            reserved = cap.reserved_mib if cap else 0
            available = max(0, gpu.total_mib - outside - reserved - margin_mib)
            rows.append(
                {
                    "host": h.name,
                    "host_up": h.up,
                    "index": gpu.index,
                    "uuid": gpu.uuid,
                    "name": gpu.name,
                    "total_mib": gpu.total_mib,
                    "free_mib": gpu.free_mib,
                    "outside_mib": outside,
                    "reserved_mib": reserved,
                    "available_mib": available,
                    "total_gb": mib_to_gb(gpu.total_mib),
                    "outside_gb": mib_to_gb(outside),
                    "reserved_gb": mib_to_gb(reserved),
                    "available_gb": mib_to_gb(available),
                    "utilization_pct": gpu.utilization_pct,
                }
            )
    return rows


def host_rows(hosts: Sequence[HostRecord]) -> list[dict[str, Any]]:
    return [
        {
            "name": h.name,
            "address": h.address,
            "up": h.up,
            "heartbeat_age_s": round(h.heartbeat_age_s, 1),
            "gpu_count": len(h.gpus),
            "gpu_source": h.gpu_source,
            "engines": list(h.engines),
            "port_range": list(h.port_range),
            "busy_ports": list(h.busy_ports),
            "worker_version": h.worker_version,
        }
        for h in hosts
    ]


def backend_rows(
    engines: Sequence[EngineRecord], in_flight: dict[str, int] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Engines clients can be routed to, split by kind. Healthy = RUNNING."""
    in_flight = in_flight or {}
    out: dict[str, list[dict[str, Any]]] = {"llm_backends": [], "embedding_backends": []}
    for rec in engines:
        if rec.state not in (EngineState.RUNNING, EngineState.UNHEALTHY) or not rec.base_url:
            continue
        key = "llm_backends" if rec.spec.kind is EngineKind.LLM else "embedding_backends"
        out[key].append(
            {
                "engine_id": rec.id,
                "model": rec.spec.model,
                "served_model_name": rec.spec.name,
                "label": rec.spec.label,
                "base_url": rec.base_url,
                "host": rec.host,
                "healthy": rec.state is EngineState.RUNNING,
                "in_flight": in_flight.get(rec.id, 0),
            }
        )
    return out
