"""Engine records and host heartbeats in Redis.

Records are JSON strings; every change goes through ``update``, an optimistic
WATCH/MULTI loop, so concurrent writers (API, workers, beat) never lose each other's
changes, and state changes go through ``EngineRecord.transition`` (the state machine).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from app.core.errors import NotFoundError
from app.core.models import EngineRecord, EngineState, GpuInfo
from app.core.state import keys
from app.core.state.client import as_text


def new_engine_id() -> str:
    return "eng-" + uuid.uuid4().hex[:12]


@dataclass
class HostRecord:
    """What a worker publishes with each heartbeat."""

    name: str
    address: str
    port_range: tuple[int, int]
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_source: str = "none"
    engines: list[str] = field(default_factory=list)
    busy_ports: list[int] = field(default_factory=list)  # in range, held by other programs
    worker_version: str = ""
    heartbeat_at: float = field(default_factory=time.time)
    up: bool = True  # derived on read: False when the heartbeat key expired

    @property
    def heartbeat_age_s(self) -> float:
        return max(0.0, time.time() - self.heartbeat_at)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = [g.to_dict() for g in self.gpus]
        d["port_range"] = list(self.port_range)
        d.pop("up")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, up: bool = True) -> HostRecord:
        return cls(
            name=d["name"],
            address=d["address"],
            port_range=(int(d["port_range"][0]), int(d["port_range"][1])),
            gpus=[GpuInfo.from_dict(g) for g in d.get("gpus", [])],
            gpu_source=d.get("gpu_source", "none"),
            engines=list(d.get("engines", [])),
            busy_ports=[int(p) for p in d.get("busy_ports", [])],
            worker_version=d.get("worker_version", ""),
            heartbeat_at=float(d.get("heartbeat_at", 0)),
            up=up,
        )


class Registry:
    """Engine records and host records. The only code that reads or writes them."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    # ------------------------------------------------------------------ engines
    def create(self, record: EngineRecord) -> EngineRecord:
        """Store a new record; an existing id is a conflict, never overwritten."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(keys.engine(record.id), json.dumps(record.to_dict()), nx=True)
        pipe.sadd(keys.ENGINES, record.id)
        created, _ = pipe.execute()
        if not created:
            raise ValueError(f"engine {record.id} already exists")
        return record

    def get(self, engine_id: str) -> EngineRecord:
        raw = self.r.get(keys.engine(engine_id))
        if raw is None:
            raise NotFoundError(f"engine {engine_id!r} not found")
        return EngineRecord.from_dict(json.loads(raw))

    def find(self, engine_id: str) -> EngineRecord | None:
        try:
            return self.get(engine_id)
        except NotFoundError:
            return None

    def engines(
        self,
        *,
        state: EngineState | Iterable[EngineState] | None = None,
        host: str | None = None,
        kind: str | None = None,
        label: str | None = None,
    ) -> list[EngineRecord]:
        """All records, filtered; oldest first."""
        ids = sorted(as_text(m) for m in self.r.smembers(keys.ENGINES))
        if not ids:
            return []
        raws = self.r.mget([keys.engine(i) for i in ids])
        states = (
            None if state is None else {state} if isinstance(state, EngineState) else set(state)
        )
        out = []
        for raw in raws:
            if raw is None:
                continue
            rec = EngineRecord.from_dict(json.loads(raw))
            if states is not None and rec.state not in states:
                continue
            if host is not None and rec.host != host:
                continue
            if kind is not None and rec.spec.kind.value != kind:
                continue
            if label is not None and rec.spec.label != label:
                continue
            out.append(rec)
        return sorted(out, key=lambda r: (r.created_at, r.id))

    def update(
        self, engine_id: str, mutate: Callable[[EngineRecord], None], *, retries: int = 50
    ) -> EngineRecord:
        """Apply ``mutate`` to the current record atomically (WATCH/MULTI, retried).

        ``mutate`` may raise (e.g. ``IllegalTransition``): nothing is written then.
        """
        key = keys.engine(engine_id)
        for _ in range(retries):
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise NotFoundError(f"engine {engine_id!r} not found")
                    rec = EngineRecord.from_dict(json.loads(raw))
                    mutate(rec)
                    rec.updated_at = time.time()
                    pipe.multi()
                    pipe.set(key, json.dumps(rec.to_dict()))
                    pipe.execute()
                    return rec
                except redis.WatchError:
                    continue
        raise RuntimeError(f"engine {engine_id}: too much contention updating its record")

    def transition(
        self, engine_id: str, new: EngineState, *, error: str | None = None, **fields: Any
    ) -> EngineRecord:
        """Move an engine to ``new`` (checked by the state machine) and set ``fields``."""

        def mutate(rec: EngineRecord) -> None:
            rec.transition(new, error=error)
            for name, value in fields.items():
                setattr(rec, name, value)

        return self.update(engine_id, mutate)

    def delete(self, engine_id: str) -> bool:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(keys.engine(engine_id))
        pipe.srem(keys.ENGINES, engine_id)
        deleted, _ = pipe.execute()
        return bool(deleted)

    # ------------------------------------------------------------------ hosts
    def put_host(self, record: HostRecord, ttl_s: float) -> None:
        """Publish a heartbeat; the host is DOWN once ``ttl_s`` passes without another."""
        raw = json.dumps(record.to_dict())
        pipe = self.r.pipeline(transaction=True)
        pipe.set(keys.host(record.name), raw, px=int(ttl_s * 1000))
        pipe.set(keys.host_last_seen(record.name), raw)
        pipe.sadd(keys.HOSTS, record.name)
        pipe.execute()

    def hosts(self) -> list[HostRecord]:
        """Every host ever seen, with ``up`` False for those whose heartbeat expired."""
        names = sorted(as_text(m) for m in self.r.smembers(keys.HOSTS))
        if not names:
            return []
        live = self.r.mget([keys.host(n) for n in names])
        last = self.r.mget([keys.host_last_seen(n) for n in names])
        out = []
        for name, raw_live, raw_last in zip(names, live, last, strict=True):
            raw = raw_live or raw_last
            if raw is None:
                continue
            out.append(HostRecord.from_dict(json.loads(raw), up=raw_live is not None))
            del name
        return out

    def host(self, name: str) -> HostRecord | None:
        return next((h for h in self.hosts() if h.name == name), None)

    def forget_host(self, name: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(keys.host(name), keys.host_last_seen(name))
        pipe.srem(keys.HOSTS, name)
        pipe.execute()
