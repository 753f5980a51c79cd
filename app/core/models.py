"""Plain data of the domain: GPUs, hosts, engine specs and records, engine states.

No Redis, Flask or Celery here. Records serialise to and from plain dicts (JSON).
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from typing import Any

from app.core.engine_policy import check_env
from app.core.errors import IllegalTransition, ValidationError

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


class EngineKind(enum.StrEnum):
    LLM = "llm"
    EMBEDDING = "embedding"


DEFAULT_RUNTIME = {EngineKind.LLM: "vllm", EngineKind.EMBEDDING: "embedding"}
RUNTIMES_BY_KIND = {
    EngineKind.LLM: ("vllm", "transformers"),
    EngineKind.EMBEDDING: ("embedding",),
}

# A model is a HF repo id ("Qwen/Qwen2.5-7B-Instruct") or a local path. Argv is never
# built through a shell, but a model string with shell metacharacters is still refused:
# it is always a mistake and would be dangerous in logs copied into a terminal.
_MODEL_RE = re.compile(r"^[A-Za-z0-9_./~+-][A-Za-z0-9_./~+:@=-]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")


@dataclass(frozen=True)
class EngineSpec:
    """What a user asks for. Validated once, here, by ``validate``."""

    model: str
    kind: EngineKind = EngineKind.LLM
    runtime: str | None = None
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    use_gpu: bool | None = None
    required_memory_gb: float | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    quantization: str | None = None
    port: int | None = None
    host: str | None = None
    gpu_ids: tuple[int, ...] | None = None
    label: str | None = None
    served_model_name: str | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    preset: str | None = None
    preset_engine: str | None = None

    @property
    def gpu_count(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel if self.wants_gpu else 0

    @property
    def wants_gpu(self) -> bool:
        if self.use_gpu is None:
            return self.kind is EngineKind.LLM
        return self.use_gpu

    @property
    def effective_runtime(self) -> str:
        return self.runtime or DEFAULT_RUNTIME[self.kind]

    @property
    def name(self) -> str:
        """The name clients use: served name, else the model id."""
        return self.served_model_name or self.model

    def validate(self) -> EngineSpec:
        """Raise ``ValidationError`` naming the field; return self when valid."""
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValidationError("model: required", field="model")
        if len(self.model) > 512 or not _MODEL_RE.match(self.model):
            raise ValidationError(
                f"model: {self.model!r} is not a Hugging Face repo id or a path "
                "(letters, digits and ._-/~+:@= only)",
                field="model",
            )
        if self.runtime is not None and self.runtime not in RUNTIMES_BY_KIND[self.kind]:
            raise ValidationError(
                f"runtime: {self.runtime!r} cannot serve kind {self.kind.value!r}; "
                f"use one of {', '.join(RUNTIMES_BY_KIND[self.kind])}",
                field="runtime",
            )
        for name in ("tensor_parallel", "pipeline_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValidationError(f"{name}: must be an integer >= 1, got {value!r}", field=name)
        if self.required_memory_gb is not None and not self.required_memory_gb > 0:
            raise ValidationError(
                f"required_memory_gb: must be > 0, got {self.required_memory_gb!r}",
                field="required_memory_gb",
            )
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValidationError(
                f"max_model_len: must be >= 16, got {self.max_model_len!r}", field="max_model_len"
            )
        if self.port is not None and not (1 <= self.port <= 65535):
            raise ValidationError(f"port: {self.port} is not a TCP port", field="port")
        if self.gpu_ids is not None:
            if not self.wants_gpu:
                raise ValidationError("gpu_ids: given but the engine uses no GPU", field="gpu_ids")
            if len(set(self.gpu_ids)) != len(self.gpu_ids) or any(i < 0 for i in self.gpu_ids):
                raise ValidationError(
                    f"gpu_ids: must be distinct indices >= 0, got {list(self.gpu_ids)}",
                    field="gpu_ids",
                )
            if len(self.gpu_ids) != self.gpu_count:
                raise ValidationError(
                    f"gpu_ids: {len(self.gpu_ids)} given, tensor_parallel x pipeline_parallel "
                    f"= {self.gpu_count} needed",
                    field="gpu_ids",
                )
        for name in ("label", "served_model_name", "host"):
            value = getattr(self, name)
            if value is not None and not _NAME_RE.match(value):
                raise ValidationError(
                    f"{name}: {value!r} must be 1-128 letters, digits or ._:/- ", field=name
                )
        if not all(isinstance(a, str) for a in self.extra_args):
            raise ValidationError("extra_args: must be a list of strings", field="extra_args")
        check_env(self.env)  # the allow-list: app.core.engine_policy
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["gpu_ids"] = list(self.gpu_ids) if self.gpu_ids is not None else None
        d["extra_args"] = list(self.extra_args)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineSpec:
        """Build from plain data; unknown fields and wrong types are ``ValidationError``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValidationError(f"{unknown[0]}: unknown field", field=unknown[0])
        data = dict(d)
        try:
            data["kind"] = EngineKind(data.get("kind", "llm"))
        except ValueError:
            raise ValidationError(
                f"kind: {data.get('kind')!r} is not one of llm, embedding", field="kind"
            ) from None
        if data.get("gpu_ids") is not None:
            data["gpu_ids"] = tuple(_as_int(v, "gpu_ids") for v in data["gpu_ids"])
        if "extra_args" in data:
            if isinstance(data["extra_args"], str) or data["extra_args"] is None:
                raise ValidationError("extra_args: must be a list of strings", field="extra_args")
            data["extra_args"] = tuple(data["extra_args"])
        for name in ("tensor_parallel", "pipeline_parallel", "port", "max_model_len"):
            if data.get(name) is not None:
                data[name] = _as_int(data[name], name)
        if data.get("required_memory_gb") is not None:
            value = data["required_memory_gb"]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValidationError(
                    f"required_memory_gb: must be a number, got {value!r}",
                    field="required_memory_gb",
                )
        if data.get("env") is not None and not isinstance(data["env"], dict):
            raise ValidationError("env: must be a mapping of names to strings", field="env")
        data["env"] = {str(k): str(v) for k, v in (data.get("env") or {}).items()}
        return cls(**data)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name}: must be an integer, got {value!r}", field=name)
    return value


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
