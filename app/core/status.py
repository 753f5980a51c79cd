"""Cluster status views, pure: hosts, GPUs, engines and reservations as plain dicts.

Each is one pass over what it is given; engines are given as their records' dicts (the
API's representation, ``EngineRecord.to_dict``), so no record object is built per
engine to answer a status request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from app.core.gpus import GpuCapacity, mib_to_gb
from app.core.models import EngineState, HostRecord
from app.core.spec import EngineKind

_ROUTABLE = {EngineState.RUNNING.value, EngineState.UNHEALTHY.value}


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


def state_counts(states: Iterable[str]) -> dict[str, int]:
    """Engines per state (only states that have one), in one pass."""
    return dict(Counter(states))


def backend_rows(
    engines: Iterable[Mapping[str, Any]], in_flight: dict[str, int] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Engines clients can be routed to, split by kind. Healthy = RUNNING.

    ``engines``: records as dicts (``EngineRecord.to_dict``)."""
    in_flight = in_flight or {}
    out: dict[str, list[dict[str, Any]]] = {"llm_backends": [], "embedding_backends": []}
    for rec in engines:
        if rec["state"] not in _ROUTABLE or not rec.get("base_url"):
            continue
        spec = rec["spec"]
        kind = spec.get("kind", EngineKind.LLM.value)
        key = "llm_backends" if kind == EngineKind.LLM.value else "embedding_backends"
        out[key].append(
            {
                "engine_id": rec["id"],
                "model": spec["model"],
                # EngineSpec.name: the served name, else the model id
                "served_model_name": spec.get("served_model_name") or spec["model"],
                "label": spec.get("label"),
                "base_url": rec["base_url"],
                "host": rec.get("host"),
                "external": bool(rec.get("external_url")),  # registered: no host of ours
                "healthy": rec["state"] == EngineState.RUNNING.value,
                "in_flight": in_flight.get(rec["id"], 0),
            }
        )
    return out
