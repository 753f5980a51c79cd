"""Engine records and host heartbeats in Redis.

Records are JSON strings. Every write goes through the ledger's one atomic script
(``ledger.Committer``): ``update`` reads the record, applies the caller's change and
writes it only if the record is still the one it read (compare-and-set, retried), so
concurrent writers (API, workers, beat) never lose each other's changes. State changes
go through ``EngineRecord.transition`` (the state machine). The same write takes a
reservation when the caller grants one and releases the engine's reservation when the
new record owns nothing (``EngineRecord.owns_nothing``): a record and its reservation
never disagree, whichever write fails or races.

The same write PUBLISHes the change on ``keys.ENGINE_CHANGES`` and appends a state
change to the engine's timeline (``app.state.events``), so ``wait`` learns of a change
within a round trip instead of polling.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypedDict, Unpack

import redis

from app.core.errors import NotFoundError
from app.core.models import EngineRecord, EngineState, HostRecord
from app.state import keys
from app.state.client import as_text
from app.state.events import EngineEvents, encode_event
from app.state.ledger import (
    PORT_MARK,
    CommitResult,
    Committer,
    Eviction,
    RecordExists,
    ReserveRequest,
    StaleRecord,
)
from app.state.snapshot import DocumentCache, Snapshot, stored_record_matches
from app.state.write_seq import WAIT_REREAD_S, change_notices

Mutate = Callable[[EngineRecord], None]
# A reservation to take in the same write: a request, or one made from the new record.
Reserve = ReserveRequest | Callable[[EngineRecord], ReserveRequest | None] | None
# Events to append in the same write: JSON strings (``events.encode_event``), or a
# function of the mutated record returning them (an event that depends on the outcome).
Events = Sequence[str] | Callable[[EngineRecord], Sequence[str]]
# Engines whose room a reservation takes in the same write: (engine id, the change of
# its record, events for its timeline). A change that raises aborts the whole write.
Evict = Sequence[tuple[str, Mutate, Sequence[str]]]


class CommitOptions(TypedDict, total=False):
    """The keyword options of ``Registry.commit`` (described, with their defaults,
    there), which ``Registry.update`` passes on."""

    reserve: Reserve
    require_reserved: bool
    retries: int
    events: Events
    evict: Evict


def new_engine_id() -> str:
    return "eng-" + uuid.uuid4().hex[:12]


class Registry:
    """Engine records and host records. The only code that reads or writes them."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._commit = Committer(client)
        self._documents = DocumentCache(client)
        self.events = EngineEvents(client)  # each engine's timeline

    def snapshot(
        self, *, engines: bool = True, capacity: bool = False, reservations: bool = False
    ) -> Snapshot:
        """Engine records (as stored), hosts, and (when asked) GPU capacity and
        reservations, in one round trip whatever the number of engines
        (``app.state.snapshot``); a record is read and decoded only when it was
        written since this registry last read it. Shared between reads: read only."""
        return Snapshot.read(
            self._documents,
            engines=engines,
            capacity=capacity,
            reservations=reservations,
        )

    # ------------------------------------------------------------------ engines
    def create(
        self,
        record: EngineRecord,
        *,
        reserve: ReserveRequest | None = None,
        events: Sequence[str] = (),
        evict: Evict = (),
    ) -> EngineRecord:
        """Store a new record (and take ``reserve`` in the same atomic step); an
        existing id is a conflict (``RecordExists``), never overwritten. A refused
        reservation raises ``ReservationConflict`` and writes nothing. ``events``
        (``events.encode_event``) start its timeline in the same step; ``PORT_MARK``
        in them becomes the port reserved."""
        raw = _encode(record, port_from_reservation=_picks_port(reserve))
        for _ in range(100):
            try:
                result = self._commit(
                    record.id,
                    mode="create",
                    new=raw,
                    reserve=reserve,
                    notify=_notice(record.id, record.state.value),
                    events=events,
                    evict=[self._eviction(v, change, ev) for v, change, ev in evict],
                )
                break
            except StaleRecord:  # an engine it evicts changed since it was read
                continue
        else:
            raise RuntimeError(f"engine {record.id}: too much contention evicting")
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
        wanted = _state_values(state)
        out = []
        for raw in raws:
            if raw is None:
                continue
            d = json.loads(raw)
            # Filter on the stored fields: only the records kept are built.
            if stored_record_matches(d, wanted, host, kind, label):
                out.append(EngineRecord.from_dict(d))
        return sorted(out, key=lambda r: (r.created_at, r.id))

    def update(
        self, engine_id: str, mutate: Mutate, **options: Unpack[CommitOptions]
    ) -> EngineRecord:
        """Apply ``mutate`` to the current record atomically: ``commit``'s record."""
        return self.commit(engine_id, mutate, **options)[0]

    def commit(
        self,
        engine_id: str,
        mutate: Mutate,
        *,
        reserve: Reserve = None,
        require_reserved: bool = False,
        retries: int = 100,
        events: Events = (),
        evict: Evict = (),
    ) -> tuple[EngineRecord, CommitResult]:
        """Apply ``mutate`` to the current record and write it in one atomic step that
        also takes ``reserve`` (a request, or a function of the mutated record) and
        releases the reservation when the new record owns nothing.

        ``mutate`` may raise (e.g. ``IllegalTransition``): nothing is written then.
        ``require_reserved``: write only while the engine holds its reservation
        (``Unreserved`` otherwise). A refused reservation raises
        ``ReservationConflict``; nothing is written.

        The write is published (``keys.ENGINE_CHANGES``); a state change is appended to
        the engine's timeline (kind ``state``: from, to, ``last_error`` when set), and
        so are ``events`` (or ``events(mutated record)``), all in the same step: no
        extra Redis write.

        ``evict``: engines whose room ``reserve`` takes (``ledger.Eviction``): each
        record is changed and compared like this one, and its reservation released, in
        the same step; a victim that changed since it was read retries the whole write.
        """
        for _ in range(retries):
            raw, rec, timeline = self._read_changed(engine_id, mutate, events)
            req = reserve(rec) if callable(reserve) else reserve
            evictions = [self._eviction(v, change, ev) for v, change, ev in evict]
            try:
                result = self._commit(
                    engine_id,
                    mode="update",
                    expected=raw,
                    new=_encode(rec, port_from_reservation=_picks_port(req)),
                    release=rec.owns_nothing,
                    reserve=req,
                    require_reserved=require_reserved,
                    notify=_notice(engine_id, rec.state.value),
                    events=timeline,
                    evict=evictions,
                )
            except StaleRecord:
                continue
            if result.port is not None:
                rec.port = result.port
            return rec, result
        raise RuntimeError(f"engine {engine_id}: too much contention updating its record")

    def _read_changed(
        self, engine_id: str, mutate: Mutate, events: Events
    ) -> tuple[bytes, EngineRecord, list[str]]:
        """The record as stored, the record changed by ``mutate`` (stamped), and what
        its write appends to the timeline: the state change (if any), then ``events``."""
        raw = self.r.get(keys.engine(engine_id))
        if raw is None:
            raise NotFoundError(f"engine {engine_id!r} not found")
        rec = EngineRecord.from_dict(json.loads(raw))
        before = rec.state
        mutate(rec)
        rec.updated_at = time.time()
        timeline = list(events(rec) if callable(events) else events)
        if rec.state is not before:
            timeline.insert(0, _state_event(before, rec))
        return raw if isinstance(raw, bytes) else raw.encode(), rec, timeline

    def _eviction(self, engine_id: str, change: Mutate, events: Sequence[str]) -> Eviction:
        raw, victim, timeline = self._read_changed(engine_id, change, events)
        return Eviction(
            engine_id,
            raw,
            _encode(victim, port_from_reservation=False),
            _notice(engine_id, victim.state.value),
            tuple(timeline),
        )

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
                self._commit(
                    engine_id,
                    mode="delete",
                    expected=raw,
                    release=True,
                    notify=_notice(engine_id, DELETED),
                )
            except StaleRecord:
                continue
            return True
        raise RuntimeError(f"engine {engine_id}: too much contention deleting its record")

    def wait(
        self,
        engine_id: str,
        done: Callable[[EngineRecord], bool],
        timeout_s: float,
        *,
        reread_s: float = WAIT_REREAD_S,
    ) -> EngineRecord:
        """The record once ``done`` holds for it, else when ``timeout_s`` ran out (the
        last record seen). ``NotFoundError`` if the record is (or gets) deleted.

        Event-driven: it subscribes to ``keys.ENGINE_CHANGES`` first, then reads the
        record, then re-reads it only when a write of this engine is announced (every
        record write publishes, in the same step). ``reread_s``: a re-read when nothing
        was heard for that long, against a lost message.
        """
        deadline = time.monotonic() + timeout_s
        with change_notices(self.r, deadline) as pubsub:
            rec = self.get(engine_id)
            last_read = time.monotonic()
            while not done(rec):
                now = time.monotonic()
                if now >= deadline:
                    break
                msg = pubsub.get_message(timeout=min(deadline - now, reread_s))
                if msg is None or msg["type"] != "message":
                    if time.monotonic() - last_read < reread_s:
                        continue  # woken early without news (a deadline, a confirmation)
                else:
                    notice = json.loads(msg["data"])
                    if notice.get("id") != engine_id:
                        continue
                    if notice.get("state") == DELETED:
                        raise NotFoundError(f"engine {engine_id!r} was deleted")
                rec = self.get(engine_id)
                last_read = time.monotonic()
            return rec

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
        """Every host ever seen, with ``up`` False for those whose heartbeat expired
        (two round trips: the names, then every heartbeat and last-seen record)."""
        names = sorted(as_text(m) for m in self.r.smembers(keys.HOSTS))
        if not names:
            return []
        pipe = self.r.pipeline(transaction=False)
        pipe.mget([keys.host(n) for n in names])
        pipe.mget([keys.host_last_seen(n) for n in names])
        live, last = pipe.execute()
        out = []
        for raw_live, raw_last in zip(live, last, strict=True):
            raw = raw_live or raw_last
            if raw is not None:
                out.append(HostRecord.from_dict(json.loads(raw), up=raw_live is not None))
        return out

    def host(self, name: str) -> HostRecord | None:
        return next((h for h in self.hosts() if h.name == name), None)

    def forget_host(self, name: str) -> None:
        """Drop a host's heartbeat, last-seen record and model facts."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(keys.host(name), keys.host_last_seen(name), keys.model_facts(name))
        pipe.srem(keys.HOSTS, name)
        pipe.execute()


def _state_values(state: EngineState | Iterable[EngineState] | None) -> set[str] | None:
    if state is None:
        return None
    return {state.value} if isinstance(state, EngineState) else {s.value for s in state}


DELETED = "DELETED"  # the state a change notice gives a deleted record


def _notice(engine_id: str, state: str) -> str:
    return json.dumps({"id": engine_id, "state": state})


def _state_event(before: EngineState, rec: EngineRecord) -> str:
    message = f"{before.value} -> {rec.state.value}"
    data: dict[str, Any] = {"from": before.value, "to": rec.state.value}
    if rec.last_error:
        message += f": {rec.last_error}"
        data["last_error"] = rec.last_error
    return encode_event("state", message, **data)


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
