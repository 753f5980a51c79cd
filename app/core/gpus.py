"""GPUs as a host's inventory reports them, and what placement and the ledger know of
each. Plain data: no NVML, Redis or Flask here.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass
from typing import Any

MIB_PER_GB = 1024


def gb_to_mib(gb: float) -> int:
    return round(gb * MIB_PER_GB)


def mib_to_gb(mib: float) -> float:
    return round(mib / MIB_PER_GB, 1)


# ---------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: int | None  # NVML may not attribute memory (e.g. in containers): None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as its host's inventory reports it (NVML or mock)."""

    index: int
    uuid: str
    name: str
    total_mib: int
    free_mib: int
    utilization_pct: int | None = None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def used_mib(self) -> int:
        return self.total_mib - self.free_mib

    def outside_mib(
        self,
        our_pids: Mapping[int, str] | AbstractSet[int],
        reserved: Mapping[str, int] | None = None,
    ) -> int:
        """Memory placement must treat as held by others.

        NVML used (total - free) minus what NVML attributes to our own engine
        processes. With ``our_pids`` mapping pid -> engine id and ``reserved`` (MiB each
        engine holds on this GPU in the ledger), an engine's memory is subtracted only
        up to its reservation: ``used - sum(min(reserved, used) per engine)``, so memory
        an engine uses beyond what it reserved counts as outside (it is not free for
        anyone). Unattributed memory (driver context, processes NVML can't see) counts
        as outside: conservative, never over-commits.
        """
        if reserved is None or not isinstance(our_pids, Mapping):
            ours = sum(p.used_mib or 0 for p in self.processes if p.pid in our_pids)
            return max(0, self.used_mib - ours)
        used_by: dict[str, int] = {}
        for p in self.processes:
            engine = our_pids.get(p.pid)
            if engine is not None:
                used_by[engine] = used_by.get(engine, 0) + (p.used_mib or 0)
        ours = sum(min(used, reserved.get(engine, 0)) for engine, used in used_by.items())
        return max(0, self.used_mib - ours)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["processes"] = [asdict(p) for p in self.processes]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GpuInfo:
        procs = tuple(GpuProcess(**p) for p in d.get("processes", ()))
        return cls(
            index=int(d["index"]),
            uuid=str(d["uuid"]),
            name=str(d.get("name", "")),
            total_mib=int(d["total_mib"]),
            free_mib=int(d["free_mib"]),
            utilization_pct=d.get("utilization_pct"),
            processes=procs,
        )


@dataclass(frozen=True)
class GpuCapacity:
    """What placement and the ledger need to know of one GPU."""

    host: str
    index: int
    uuid: str
    total_mib: int
    outside_mib: int
    reserved_mib: int = 0

    def available_mib(self, margin_mib: int) -> int:
        return self.total_mib - self.outside_mib - self.reserved_mib - margin_mib
