"""Engine records and host heartbeats in Redis.

Records are JSON strings. Every write goes through the ledger's one atomic script
(``ledger.Committer``): ``update`` reads the record, applies the caller's change and
writes it only if the record is still the one it read (compare-and-set, retried), so
concurrent writers (API, workers, beat) never lose each other's changes. State changes
go through ``EngineRecord.transition`` (the state machine). The same write takes a
reservation when the caller grants one and releases the engine's reservation when the
new record owns nothing (``EngineRecord.owns_nothing``): a record and its reservation
never disagree, whichever write fails or races.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis

from app.core.errors import NotFoundError
from app.core.models import EngineRecord, EngineState, HostRecord
from app.state import keys
from app.state.client import as_text
from app.state.ledger import (
    PORT_MARK,
    CommitResult,
    Committer,
    RecordExists,
    ReserveRequest,
    StaleRecord,
)

Mutate = Callable[[EngineRecord], None]
# A reservation to take in the same write: a request, or one made from the new record.
Reserve = ReserveRequest | Callable[[EngineRecord], ReserveRequest | None] | None


def new_engine_id() -> str:
    return "eng-" + uuid.uuid4().hex[:12]


class Registry:
    """Engine records and host records. The only code that reads or writes them."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._commit = Committer(client)

    # ------------------------------------------------------------------ engines
    def create(
        self, record: EngineRecord, *, reserve: ReserveRequest | None = None
    ) -> EngineRecord:
        """Store a new record (and take ``reserve`` in the same atomic step); an
        existing id is a conflict (``RecordExists``), never overwritten. A refused
        reservation raises ``ReservationConflict`` and writes nothing."""
        raw = _encode(record, port_from_reservation=_picks_port(reserve))
        result = self._commit(record.id, mode="create", new=raw, reserve=reserve)
        if result.port is not None:
            record.port = result.port
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
        self,
        engine_id: str,
        mutate: Mutate,
        *,
        reserve: Reserve = None,
        require_reserved: bool = False,
        retries: int = 100,
    ) -> EngineRecord:
        """Apply ``mutate`` to the current record atomically; see ``commit``."""
        return self.commit(
            engine_id, mutate, reserve=reserve, require_reserved=require_reserved, retries=retries
        )[0]

    def commit(
        self,
        engine_id: str,
        mutate: Mutate,
        *,
        reserve: Reserve = None,
        require_reserved: bool = False,
        retries: int = 100,
    ) -> tuple[EngineRecord, CommitResult]:
        """Apply ``mutate`` to the current record and write it in one atomic step that
        also takes ``reserve`` (a request, or a function of the mutated record) and
        releases the reservation when the new record owns nothing.

        ``mutate`` may raise (e.g. ``IllegalTransition``): nothing is written then.
        ``require_reserved``: write only while the engine holds its reservation
        (``Unreserved`` otherwise). A refused reservation raises
        ``ReservationConflict``; nothing is written.
        """
        key = keys.engine(engine_id)
        for _ in range(retries):
            raw = self.r.get(key)
            if raw is None:
                raise NotFoundError(f"engine {engine_id!r} not found")
            rec = EngineRecord.from_dict(json.loads(raw))
            mutate(rec)
            rec.updated_at = time.time()
            req = reserve(rec) if callable(reserve) else reserve
            try:
                result = self._commit(
                    engine_id,
                    mode="update",
                    expected=raw,
                    new=_encode(rec, port_from_reservation=_picks_port(req)),
                    release=rec.owns_nothing,
                    reserve=req,
                    require_reserved=require_reserved,
                )
            except StaleRecord:
                continue
            if result.port is not None:
                rec.port = result.port
            return rec, result
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

    def delete(
        self, engine_id: str, *, only_if: Callable[[EngineRecord], bool] | None = None
    ) -> bool:
        """Delete the record and release what the engine holds, in one atomic step.

        ``only_if`` is checked on the record as it is at that step; False: nothing is
        deleted. Returns whether a record was deleted.
        """
        key = keys.engine(engine_id)
        for _ in range(100):
            raw = self.r.get(key)
            if raw is None:
                return False
            if only_if is not None and not only_if(EngineRecord.from_dict(json.loads(raw))):
                return False
            try:
                self._commit(engine_id, mode="delete", expected=raw, release=True)
            except StaleRecord:
                continue
            return True
        raise RuntimeError(f"engine {engine_id}: too much contention deleting its record")

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
        """Drop a host's heartbeat, last-seen record and model facts."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(keys.host(name), keys.host_last_seen(name), keys.model_facts(name))
        pipe.srem(keys.HOSTS, name)
        pipe.execute()


def _picks_port(req: ReserveRequest | None) -> bool:
    return req is not None and req.port is None and not req.reclaim


def _encode(rec: EngineRecord, *, port_from_reservation: bool) -> str:
    """The record's JSON; with the port left for the commit script to fill in when the
    reservation written in the same step picks it."""
    d = rec.to_dict()
    if port_from_reservation:
        d["port"] = PORT_MARK
        d["base_url"] = f"http://{rec.address}:{PORT_MARK}" if rec.address else None
    return json.dumps(d)


__all__ = ["HostRecord", "RecordExists", "Registry", "new_engine_id"]
