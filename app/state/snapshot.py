"""The whole cluster as Redis holds it, in one round trip: what status views answer from.

``Snapshot.read`` runs one read-only script (``_SNAPSHOT``) that returns, in four
replies whatever the size of the cluster:

1. every engine record, as stored, joined by newlines (stored JSON has none);
2. every known host's heartbeat (or, once it expired, last-seen) record;
3. each host's GPUs: capacity and the MiB reserved on each;
4. every reservation.

Per engine it costs the bytes of its record (and of its reservation when asked for),
and one JSON decode only when the record changed since this process last read it
(``DocumentCache``): an unchanged record is neither decoded nor encoded again, and the
API sends its stored JSON as it is (``app.api.documents``). The reply is consistent:
Redis runs the script atomically, so counts, records and reservations agree.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import redis

from app.core.models import EngineRecord, GpuCapacity, HostRecord
from app.core.spec import EngineKind
from app.state.ledger import KEY_NAMES, Reservation

# ARGV[1]: key names (ledger.KEY_NAMES); ARGV[2..4]: "1" to read engines, GPU capacity,
# reservations. Hosts are always read.
_SNAPSHOT = r"""
local K = cjson.decode(ARGV[1])
local records, hosts, capacity, reservations = {}, {}, {}, {}
if ARGV[2] == '1' then
  local ids = redis.call('SMEMBERS', K.engines)
  for i = 1, #ids, 500 do
    local keys = {}
    for j = i, math.min(i + 499, #ids) do keys[#keys + 1] = K.engine .. ids[j] end
    for _, raw in ipairs(redis.call('MGET', unpack(keys))) do
      if raw then records[#records + 1] = raw end
    end
  end
end
for _, name in ipairs(redis.call('SMEMBERS', K.hosts)) do
  local live = redis.call('GET', K.host .. name)
  local raw = live or redis.call('GET', K.host_last .. name)
  if raw then hosts[#hosts + 1] = {raw, live and true or false} end
  if ARGV[3] == '1' then
    local caps = redis.call('HGETALL', K.capacity .. name)
    local gpus = {}
    for i = 1, #caps, 2 do
      local reserved = 0
      for _, v in ipairs(redis.call('HVALS', K.gpu .. name .. ':' .. caps[i])) do
        reserved = reserved + tonumber(v)
      end
      gpus[#gpus + 1] = {caps[i], cjson.decode(caps[i + 1]), reserved}
    end
    capacity[name] = gpus
  end
end
if ARGV[4] == '1' then
  for _, eid in ipairs(redis.call('SMEMBERS', K.reserved)) do
    local h = redis.call('HGETALL', K.reservation .. eid)
    if #h > 0 then
      local res = {id = eid}
      for i = 1, #h, 2 do res[h[i]] = h[i + 1] end
      res.gpus = cjson.decode(res.gpus or '[]')
      reservations[#reservations + 1] = res
    end
  end
end
return {table.concat(records, '\n'), cjson.encode(hosts), cjson.encode(capacity),
  cjson.encode(reservations)}
"""

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


class DocumentCache:
    """Decoded records, reused while the stored bytes are the same; and the snapshot
    script, registered once."""

    def __init__(self, client: redis.Redis) -> None:
        self._docs: dict[bytes, EngineDocument] = {}
        self._lock = threading.Lock()
        self.script = client.register_script(_SNAPSHOT)

    def documents(self, raws: list[bytes]) -> list[EngineDocument]:
        """The documents of ``raws``, oldest first; keeps only these for the next read."""
        with self._lock:
            old = self._docs
        new: dict[bytes, EngineDocument] = {}
        for raw in raws:
            doc = old.get(raw)
            new[raw] = doc if doc is not None else _decode(raw)
        with self._lock:
            self._docs = new
        return sorted(new.values(), key=lambda d: (d.doc.get("created_at") or 0.0, d.id))


def _decode(raw: bytes) -> EngineDocument:
    doc = json.loads(raw)
    if doc.keys() != _RECORD_FIELDS:
        # Written by another version (a field added or gone): send it as this one does.
        doc = EngineRecord.from_dict(doc).to_dict()
        raw = json.dumps(doc).encode()
    return EngineDocument(str(doc["id"]), raw, doc)


@dataclass
class Snapshot:
    """Engines (oldest first), hosts (by name), GPU capacity per host (by index) and
    reservations (by engine id), from one atomic read (see the module docstring)."""

    engines: list[EngineDocument] = field(default_factory=list)
    hosts: list[HostRecord] = field(default_factory=list)
    capacity: dict[str, list[GpuCapacity]] = field(default_factory=dict)
    reservations: list[Reservation] = field(default_factory=list)

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
        flags = ["1" if x else "0" for x in (engines, capacity, reservations)]
        replies = cache.script(args=[KEY_NAMES, *flags])
        raw_records, raw_hosts, raw_capacity, raw_reservations = replies
        out = cls()
        if raw_records:
            out.engines = cache.documents(raw_records.split(b"\n"))
        hosts = [
            HostRecord.from_dict(json.loads(raw), up=bool(up))
            for raw, up in json.loads(raw_hosts) or []
        ]
        out.hosts = sorted(hosts, key=lambda h: h.name)
        for host, gpus in (json.loads(raw_capacity) or {}).items():
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
            out.capacity[host] = sorted(rows, key=lambda g: g.index)
        held = [
            Reservation(
                r["id"],
                r["host"],
                int(r["port"]),
                tuple((str(u), int(m)) for u, m in r["gpus"] or []),
            )
            for r in json.loads(raw_reservations) or []
        ]
        out.reservations = sorted(held, key=lambda r: r.engine_id)
        return out


__all__ = ["DocumentCache", "EngineDocument", "Snapshot", "stored_record_matches"]
