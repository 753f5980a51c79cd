"""Plain data of the domain: GPUs, engine records and the engine state machine.

What a user asks for (``EngineSpec``) is in ``app.core.spec``.

No Redis, Flask or Celery here. Records serialise to and from plain dicts (JSON).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from typing import Any

from app.core.errors import IllegalTransition
from app.core.spec import EngineSpec

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


# ---------------------------------------------------------------------------- engines


class EngineState(enum.StrEnum):
    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    LOST = "LOST"


S = EngineState
# The state machine of ARCHITECTURE.md. LOST is reachable from any live state (its
# host's heartbeat expired) and leaves to whatever the host's worker finds on return.
ALLOWED_TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    S.PENDING: frozenset({S.STARTING, S.FAILED, S.STOPPING, S.LOST}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.STOPPING, S.LOST}),
    S.RUNNING: frozenset({S.UNHEALTHY, S.STOPPING, S.LOST}),
    S.UNHEALTHY: frozenset({S.RUNNING, S.STARTING, S.FAILED, S.STOPPING, S.LOST}),
    S.STOPPING: frozenset({S.STOPPED, S.LOST}),
    S.STOPPED: frozenset(),
    # restart with backoff; a stop while a restart is pending ends it at once
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
    S.LOST: frozenset({S.RUNNING, S.UNHEALTHY, S.STARTING, S.FAILED, S.STOPPING, S.STOPPED}),
}
TERMINAL_STATES = frozenset({S.STOPPED, S.FAILED})
LIVE_STATES = frozenset({S.PENDING, S.STARTING, S.RUNNING, S.UNHEALTHY, S.STOPPING})


def check_transition(current: EngineState, new: EngineState) -> None:
    """The one place that decides whether an engine may move from ``current`` to ``new``."""
    if new not in ALLOWED_TRANSITIONS[current]:
        raise IllegalTransition(f"engine state {current.value} -> {new.value} is not allowed")


@dataclass
class GpuAssignment:
    index: int
    uuid: str
    memory_mib: int


@dataclass
class EngineRecord:
    """An engine as the registry knows it."""

    id: str
    spec: EngineSpec
    state: EngineState = EngineState.PENDING
    host: str | None = None
    address: str | None = None
    port: int | None = None
    gpus: list[GpuAssignment] = field(default_factory=list)
    memory_per_gpu_mib: int = 0
    launch: dict[str, Any] = field(default_factory=dict)  # runtime flags from the estimate
    pid: int | None = None
    process_create_time: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    state_changed_at: float = field(default_factory=time.time)
    restart_count: int = 0
    last_error: str | None = None
    task_id: str | None = None
    exit_code: int | None = None
    log_path: str | None = None
    start_deadline: float | None = None  # STARTING: fail if not ready by then
    next_restart_at: float | None = None  # set while a restart is pending (backoff)
    health_failures: int = 0  # failed health checks in a row
    last_health_at: float | None = None
    running_since: float | None = None  # when this process became ready (restart budget)
    # Set while a running engine could not re-take its reservation (someone else took
    # the room while Redis was lost): the engine is UNHEALTHY until it can.
    reservation_error: str | None = None

    def request_stop(self) -> None:
        """A stop was asked for: live engines become STOPPING; a FAILED engine with a
        restart pending is STOPPED at once. Either way a pending restart is cancelled
        (in the caller's write). Already stopping or stopped: nothing changes."""
        if self.state in (EngineState.STOPPED, EngineState.STOPPING):
            return
        if self.state is EngineState.FAILED:
            if self.next_restart_at is not None:
                self.transition(EngineState.STOPPED, error="stopped while a restart was pending")
        else:
            self.transition(EngineState.STOPPING)
        self.next_restart_at = None

    @property
    def owns_nothing(self) -> bool:
        """STOPPED, or FAILED with no restart pending: holds no GPU memory, no port.

        Every write that makes this true releases the reservation in the same step.
        """
        return self.state is EngineState.STOPPED or (
            self.state is EngineState.FAILED and self.next_restart_at is None
        )

    @property
    def base_url(self) -> str | None:
        if self.address is None or self.port is None:
            return None
        return f"http://{self.address}:{self.port}"

    def transition(self, new: EngineState, *, error: str | None = None) -> None:
        """Move to ``new`` (via ``check_transition``), stamping the time."""
        check_transition(self.state, new)
        now = time.time()
        self.state = new
        self.state_changed_at = now
        self.updated_at = now
        if error is not None:
            self.last_error = error

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["state"] = self.state.value
        d["base_url"] = self.base_url
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineRecord:
        data = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        data["spec"] = EngineSpec.from_dict(d["spec"])
        data["state"] = EngineState(d["state"])
        data["gpus"] = [GpuAssignment(**g) for g in d.get("gpus", [])]
        return cls(**data)
