"""The whole cluster as Redis holds it, in one round trip: what status views answer from.

``Snapshot.read`` runs one script (``_SNAPSHOT``) that returns, in one reply whatever
the size of the cluster:

1. the number of the last write (``app.state.write_seq``) and the engine ids;
2. the engine records written since this process last read them, as stored, joined by
   newlines (stored JSON has none): every record the first time, then only those whose
   number (``keys.RECORD_SEQS``) is past the one this process read last, none when
   nothing was written since;
3. every known host's heartbeat (or, once it expired, last-seen) record;
4. each host's GPUs: capacity and the MiB reserved on each;
5. every reservation, when one changed since this process last read them
   (``keys.LEDGER_SEQ``).

``DocumentCache`` keeps what was read: each record's JSON and its decoded dict, and the
reservations. Per engine a read costs the bytes of its id, plus the bytes of its record
and one JSON decode only when it was written since this process's last read; the API
sends stored JSON as it is (``app.api.documents``). A record written without a number
(by another version of this code) is read every time. The reply is consistent: Redis
runs the script atomically, so counts, records and reservations agree.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import redis

from app.core.gpus import GpuCapacity
from app.core.models import EngineRecord, HostRecord
from app.core.spec import EngineKind
from app.state.ledger import KEY_NAMES, Reservation
from app.state.lua_scripts import lua_script

_SNAPSHOT = lua_script("snapshot.lua")  # its arguments are described there

_RECORD_FIELDS = frozenset(EngineRecord.__dataclass_fields__) | {"base_url"}


@dataclass(frozen=True)
class EngineDocument:
    """One engine record as stored: ``raw`` is its JSON (the API's representation of
    the record), ``doc`` the same decoded. ``doc`` is shared between reads: read only."""

    id: str
    raw: bytes
    doc: dict[str, Any]

    @property
    def state(self) -> str:
        return str(self.doc["state"])

    def matches(
        self,
        states: set[str] | None = None,
        host: str | None = None,
        kind: str | None = None,
        label: str | None = None,
    ) -> bool:
        """Whether the record passes the list filters (``None``: any)."""
        return stored_record_matches(self.doc, states, host, kind, label)


def stored_record_matches(
    d: dict[str, Any],
    states: set[str] | None = None,
    host: str | None = None,
    kind: str | None = None,
    label: str | None = None,
) -> bool:
    """Whether a stored (decoded, not yet built) record passes the engine list filters
    (``None``: any): the one filter of ``Registry.engines`` and the status views."""
    spec = d.get("spec") or {}
    return (
        (states is None or d.get("state") in states)
        and (host is None or d.get("host") == host)
        and (kind is None or spec.get("kind", EngineKind.LLM.value) == kind)
        and (label is None or spec.get("label") == label)
    )


@dataclass(frozen=True)
class _Read:
    """What one read left: records (by id, and oldest first) as of write ``seq``, and
    reservations as of ledger number ``ledger_seq`` ('' for what was not read)."""

    seq: str = ""
    docs: dict[str, EngineDocument] = field(default_factory=dict)
    ordered: list[EngineDocument] = field(default_factory=list)
    ledger_seq: str = ""
    reservations: list[Reservation] = field(default_factory=list)


class DocumentCache:
    """The records and reservations this process read last, and the number of the
    write they are as of (see the module docstring); and the snapshot script."""

    def __init__(self, client: redis.Redis) -> None:
        self._last = _Read()
        self._lock = threading.Lock()
        self.script = client.register_script(_SNAPSHOT)
        # The hosts and the capacity last parsed, with the reply they came from: the
        # same reply (no heartbeat since) gives the same objects back.
        self._hosts: tuple[bytes, list[HostRecord]] = (b"", [])
        self._capacity: tuple[bytes, dict[str, list[GpuCapacity]]] = (b"", {})

    def hosts(self, raw: bytes) -> list[HostRecord]:
        """The hosts of a reply, by name (parsed only when the reply changed)."""
        last_raw, last = self._hosts
        if raw == last_raw:
            return last
        hosts = [
            HostRecord.from_dict(json.loads(record), up=bool(up))
            for record, up in json.loads(raw) or []
        ]
        parsed = sorted(hosts, key=lambda h: h.name)
        self._hosts = (raw, parsed)
        return parsed

    def capacity(self, raw: bytes) -> dict[str, list[GpuCapacity]]:
        """GPU capacity per host of a reply, by index (parsed only when it changed)."""
        last_raw, last = self._capacity
        if raw == last_raw:
            return last
        out: dict[str, list[GpuCapacity]] = {}
        for host, gpus in (json.loads(raw) or {}).items():
            rows = [
                GpuCapacity(
                    host=host,
                    index=int(cap["index"]),
                    uuid=uuid,
                    total_mib=int(cap["total_mib"]),
                    outside_mib=int(cap["outside_mib"]),
                    reserved_mib=int(reserved),
                )
                for uuid, cap, reserved in gpus or []
            ]
            out[host] = sorted(rows, key=lambda g: g.index)
        self._capacity = (raw, out)
        return out

    def read(self, *, engines: bool, capacity: bool, reservations: bool) -> tuple[Any, ...]:
        """Run the script against what was read last; return (engines oldest first,
        reservations, seq) and the raw hosts and capacity replies."""
        with self._lock:
            base = self._last
        flags = ["1" if x else "0" for x in (engines, capacity, reservations)]
        reply = self.script(args=[KEY_NAMES, *flags, base.seq, base.ledger_seq])
        seq, ids, raws, hosts, caps, held, ledger_seq = reply
        seq, ids, ledger_seq = _text(seq), _text(ids), _text(ledger_seq)
        now = base
        if engines:
            now = self._records(base, seq, ids, raws)
        if reservations and held:
            now = dataclasses.replace(now, ledger_seq=ledger_seq, reservations=_reservations(held))
        with self._lock:
            # Concurrent reads each answer from their own; the newest is kept (a read
            # from what is still the last one is newer, whatever its number says).
            if self._last is base or int(now.seq or 0) >= int(self._last.seq or 0):
                self._last = now
        return now.ordered if engines else [], now.reservations, int(seq), hosts, caps

    def _records(self, base: _Read, seq: str, ids: str, raws: bytes) -> _Read:
        if seq == base.seq and not raws:
            return base  # nothing written since
        fresh = {d.id: d for d in map(_decode, raws.split(b"\n") if raws else [])}
        docs: dict[str, EngineDocument] = {}
        for eid in ids.split("\n") if ids else []:
            doc = fresh.get(eid) or base.docs.get(eid)
            if doc is not None:
                docs[eid] = doc
        ordered = sorted(docs.values(), key=lambda d: (d.doc.get("created_at") or 0.0, d.id))
        return dataclasses.replace(base, seq=seq, docs=docs, ordered=ordered)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(raw: bytes) -> EngineDocument:
    doc = json.loads(raw)
    if doc.keys() != _RECORD_FIELDS:
        # Written by another version (a field added or gone): send it as this one does.
        doc = EngineRecord.from_dict(doc).to_dict()
        raw = json.dumps(doc).encode()
    return EngineDocument(str(doc["id"]), raw, doc)


def _reservations(raw: bytes) -> list[Reservation]:
    held = [
        Reservation(
            r["id"],
            r["host"],
            int(r["port"]),
            tuple((str(u), int(m)) for u, m in r["gpus"] or []),
        )
        for r in json.loads(raw) or []
    ]
    return sorted(held, key=lambda r: r.engine_id)


@dataclass
class Snapshot:
    """Engines (oldest first), hosts (by name), GPU capacity per host (by index) and
    reservations (by engine id), from one atomic read (see the module docstring), as of
    write number ``seq``. Shared with later reads while unchanged: read only."""

    engines: list[EngineDocument] = field(default_factory=list)
    hosts: list[HostRecord] = field(default_factory=list)
    capacity: dict[str, list[GpuCapacity]] = field(default_factory=dict)
    reservations: list[Reservation] = field(default_factory=list)
    seq: int = 0

    @classmethod
    def read(
        cls,
        cache: DocumentCache,
        *,
        engines: bool = True,
        capacity: bool = False,
        reservations: bool = False,
    ) -> Snapshot:
        """One round trip, whatever the size of the cluster."""
        docs, held, seq, raw_hosts, raw_capacity = cache.read(
            engines=engines, capacity=capacity, reservations=reservations
        )
        return cls(
            engines=docs,
            hosts=cache.hosts(raw_hosts),
            capacity=cache.capacity(raw_capacity) if capacity else {},
            reservations=held if reservations else [],
            seq=seq,
        )


__all__ = ["DocumentCache", "EngineDocument", "Snapshot", "stored_record_matches"]
