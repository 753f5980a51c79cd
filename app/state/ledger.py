"""The reservation ledger and the one atomic write of the state store.

Who owns which fact (see also ``registry``):

* **The engine record** (``keys.engine``) owns what an engine *is*: its spec, its
  state, where it runs (host, address, port, GPUs) and its process (pid + create
  time). The host's manifest is a copy of it on the host's disk (derived, so that a
  lost Redis can be rebuilt), and the heartbeat's engine list is derived too.
* **The ledger** owns what is *held*: per GPU, MiB reserved by each engine; per host,
  which engine holds each port; per engine, what to release (``keys.engine_reservation``).
* **The host's worker** owns what is *measured*: total and outside-held MiB per GPU
  (``keys.gpu_capacity``), republished with every heartbeat.

The record and the ledger are never changed apart: every write of a record goes
through one Lua script, ``_COMMIT`` (``lua/commit.lua``), which compares the record
with the version its caller read (compare-and-set), then in the same atomic step

* takes a reservation when the caller grants one (start, restart, re-placement,
  re-adoption), writing the port it picked into the record; a refused reservation
  writes nothing, record included;
* releases the engine's reservation whenever the new record owns nothing any more
  (STOPPED, FAILED with no restart pending, or deleted);
* refuses a write that needs a reservation the engine does not hold (a spawn of an
  engine whose room was given away);
* numbers the write and tells everyone who listens (``app.state.write_seq``): it
  PUBLISHes ``{"id", "state", "seq"}`` on ``keys.ENGINE_CHANGES`` (``"DELETED"`` on
  delete), appends the caller's events (``app.state.events``; a state change is one)
  to the engine's bounded timeline, and deletes the timeline (and an external engine's
  API key, ``keys.external_api_key``) with the record. Nothing a waiter sees can be
  ahead of or behind the record.

What it guarantees (each proved by a test against a real redis-server):

* **No over-commit.** For every GPU a reservation names, the script checks
  ``reserved by us + held outside + margin + request <= total`` and writes only if all
  fit. Redis runs a script atomically, so no two writers interleave between check and
  write.
* **One port, one engine.** The same script takes the port, refusing one already held.
* **All or nothing.** A refused reservation or a stale record writes nothing.
* **Exactly-once release.** Release deletes what the engine's reservation names and
  the reservation itself; a second release finds nothing and reports ``False``.

Capacity (total and outside-held MiB per GPU) is written by each host's worker from
its inventory; the margin is passed by the caller from settings.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from app.core.errors import ReservationConflict, ValidationError
from app.core.gpus import GpuCapacity
from app.state import keys
from app.state.events import MAX_EVENTS
from app.state.lua_scripts import lua_script
from app.state.write_seq import FINISH_WRITE_LUA, seq_of
from app.state.write_seq import KEY_NAMES as SEQ_KEY_NAMES

# The one atomic write (``lua/commit.lua``, its arguments described there), after the
# write's numbering and notice (``app.state.write_seq``), which it calls last.
_COMMIT = FINISH_WRITE_LUA + lua_script("commit.lua")
# A host's capacity, published only while its engines hold their reservations.
_PUBLISH = lua_script("publish_capacity.lua")

# Stands for the port in a record written with a reservation that picks the port.
PORT_MARK = "@@SAGELLM_PORT@@"
KEY_NAMES = json.dumps(
    {
        "engine": keys.engine(""),
        "reservation": keys.engine_reservation(""),
        "reserved": keys.RESERVED_ENGINES,
        "engines": keys.ENGINES,
        "capacity": keys.gpu_capacity(""),
        "gpu": keys.GPU_RESERVATIONS_PREFIX,
        "ports": keys.PORT_RESERVATIONS_PREFIX,
        "port_mark": PORT_MARK,
        "events": keys.engine_events(""),
        "external_key": keys.external_api_key(""),
        "max_events": MAX_EVENTS,
        "changes": keys.ENGINE_CHANGES,
        **SEQ_KEY_NAMES,
        "hosts": keys.HOSTS,
        "host": keys.host(""),
        "host_last": keys.host_last_seen(""),
    }
)


@dataclass(frozen=True)
class Reservation:
    engine_id: str
    host: str
    port: int
    gpus: tuple[tuple[str, int], ...]  # (uuid, MiB)


@dataclass(frozen=True)
class ReserveRequest:
    """Room to take on one host: MiB on each GPU (uuid, MiB) and one port.

    ``port`` asks for that port, else the lowest free one in ``port_range`` not in
    ``avoid_ports`` (ports other programs listen on, from the heartbeat).
    ``reclaim`` re-takes the room of an engine that already runs (after a lost
    Redis): already held is fine, no margin, and a GPU whose capacity is not yet
    republished is not checked (its host offers capacity only after reclaiming).
    ``move`` takes this room for an engine that holds another and gives the old one up
    in the same atomic step (its own old room counts as free; refused: nothing changes).
    """

    host: str
    gpus: tuple[tuple[str, int], ...]
    port_range: tuple[int, int]
    margin_mib: int
    port: int | None = None
    avoid_ports: tuple[int, ...] = ()
    reclaim: bool = False
    move: bool = False

    def validate(self) -> ReserveRequest:
        lo, hi = self.port_range
        if self.port is not None and not self.reclaim and not lo <= self.port <= hi:
            raise ValidationError(
                f"port: {self.port} is outside host {self.host}'s range {lo}-{hi}", field="port"
            )
        for uuid, mib in self.gpus:
            if mib <= 0:
                raise ValidationError(
                    f"required_memory_gb: reservation on GPU {uuid} must be > 0 MiB, got {mib}",
                    field="required_memory_gb",
                )
        if len({u for u, _ in self.gpus}) != len(self.gpus):
            raise ValidationError("gpu_ids: the same GPU twice", field="gpu_ids")
        return self

    def to_lua(self) -> dict[str, Any]:
        lo, hi = self.port_range
        return {
            "host": self.host,
            "gpus": [[u, int(m)] for u, m in self.gpus],
            "lo": lo,
            "hi": hi,
            "port": self.port or 0,
            "skip": sorted({p for p in self.avoid_ports if lo <= p <= hi}),
            "margin": 0 if self.reclaim else int(self.margin_mib),
            "reclaim": self.reclaim,
            "move": self.move,
        }


@dataclass(frozen=True)
class Eviction:
    """An engine whose room a reservation takes in the same atomic write: its record
    as read (``expected``, compared), its new record, its notice and events."""

    engine_id: str
    expected: bytes
    new: str
    notify: str
    events: tuple[str, ...] = ()

    def to_lua(self) -> dict[str, Any]:
        return {
            "id": self.engine_id,
            "expected": self.expected.decode(),
            "new": self.new,
            "notify": self.notify,
            "events": list(self.events),
        }


class Unreserved(ReservationConflict):
    """A write that needs the engine's reservation found none (it was released)."""


class StaleRecord(Exception):
    """The record changed since it was read (compare-and-set lost): read and retry."""


class RecordExists(ValueError):
    """``create`` of an engine id that already has a record."""


@dataclass(frozen=True)
class CommitResult:
    port: int | None  # the port reserved by this commit, if it reserved
    released: bool  # this commit released the engine's reservation (exactly once)
    seq: int | None = None  # its number (``app.state.write_seq``); None: it wrote nothing


@dataclass
class Committer:
    """Runs ``_COMMIT``: the only code that writes engine records or reservations."""

    client: redis.Redis
    _script: Any = field(init=False)

    def __post_init__(self) -> None:
        self._script = self.client.register_script(_COMMIT)

    def __call__(
        self,
        engine_id: str,
        *,
        mode: str,
        expected: bytes | str | None = None,
        new: str | None = None,
        release: bool = False,
        reserve: ReserveRequest | None = None,
        require_reserved: bool = False,
        notify: str | None = None,
        events: Sequence[str] = (),
        evict: Sequence[Eviction] = (),
    ) -> CommitResult:
        """``notify``: the JSON to PUBLISH on ``keys.ENGINE_CHANGES`` when the write
        happens; ``events``: JSON events appended to the engine's timeline in the same
        step (``PORT_MARK`` in them is replaced by the port this write reserves)."""
        op: dict[str, Any] = {
            "id": engine_id,
            "mode": mode,
            "release": release,
            "require_reserved": require_reserved,
        }
        if notify is not None:
            op["notify"] = notify
        if events:
            op["events"] = list(events)
        if reserve is not None:
            op["reserve"] = reserve.validate().to_lua()
        evictions = ""
        if evict:
            if reserve is None:
                raise ValueError("an eviction hands its room to a reservation")
            evictions = json.dumps([e.to_lua() for e in evict])
        status, detail, released, *seq = self._script(
            args=[json.dumps(op), expected or b"", new or "", KEY_NAMES, evictions]
        )
        status, detail = _text(status), _text(detail)
        if status == "OK":
            return CommitResult(int(detail) if detail else None, bool(released), seq_of(seq))
        if status == "RETRY":
            raise StaleRecord(engine_id)
        if status == "EXISTS":
            raise RecordExists(f"engine {engine_id} already exists")
        if status == "UNRESERVED":
            raise Unreserved(detail)
        raise ReservationConflict(detail)


def port_is_bindable(address: str, port: int) -> bool:
    """True if nothing on this machine listens on ``port`` at ``address``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Servers set SO_REUSEADDR, so a port in TIME_WAIT after an engine exited is
        # usable for them; an active listener still makes this bind fail.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


class Ledger:
    """GPU-memory and port reservations per host. See the module docstring.

    ``reserve`` and ``release`` here act on the ledger alone (engines without a
    record: leaked reservations, tests); engines with a record reserve and release
    through ``Registry`` writes, in the same step as their record.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.commit = Committer(client)
        self._publish = client.register_script(_PUBLISH)

    # ------------------------------------------------------------------ capacity
    def publish_capacity(
        self, host: str, gpus: Iterable[GpuCapacity], *, held_by: Iterable[str] = ()
    ) -> list[str]:
        """Record what a host's worker measured: total and outside-held MiB per GPU.

        GPUs no longer in the inventory are dropped; reservations are untouched. With
        ``held_by``, publish only if each of those engines holds its reservation (one
        atomic step: a Redis lost just before cannot make the host offer the room of a
        running engine); returns the engines that do not, and publishes nothing then.
        """
        mapping = {
            g.uuid: json.dumps(
                {"index": g.index, "total_mib": g.total_mib, "outside_mib": g.outside_mib}
            )
            for g in gpus
        }
        required = sorted(set(held_by))
        missing = self._publish(
            keys=[keys.gpu_capacity(host), keys.capacity_published(host)],
            args=[json.dumps(mapping), *(keys.engine_reservation(e) for e in required)],
        )
        prefix = len(keys.engine_reservation(""))
        return [_text(m)[prefix:] for m in missing]

    def has_capacity(self, host: str) -> bool:
        """Whether ``host``'s capacity is published (False after a lost Redis)."""
        return bool(self.r.exists(keys.capacity_published(host)))

    def capacity(self, host: str) -> list[GpuCapacity]:
        """GPUs of ``host`` with their total, outside-held and reserved MiB, by index."""
        raw: dict[bytes, bytes] = self.r.hgetall(keys.gpu_capacity(host))  # type: ignore[assignment]
        uuids = sorted(raw)
        pipe = self.r.pipeline(transaction=False)
        for u in uuids:
            pipe.hvals(keys.gpu_reservations(host, u.decode()))
        reserved = pipe.execute()
        out = []
        for u, vals in zip(uuids, reserved, strict=True):
            cap = json.loads(raw[u])
            out.append(
                GpuCapacity(
                    host=host,
                    index=int(cap["index"]),
                    uuid=u.decode(),
                    total_mib=int(cap["total_mib"]),
                    outside_mib=int(cap["outside_mib"]),
                    reserved_mib=sum(int(v) for v in vals),
                )
            )
        return sorted(out, key=lambda g: g.index)

    def gpu_reservations(self, host: str, uuids: Iterable[str]) -> dict[str, dict[str, int]]:
        """Per GPU uuid: MiB reserved by each engine id."""
        uuids = list(uuids)
        pipe = self.r.pipeline(transaction=False)
        for u in uuids:
            pipe.hgetall(keys.gpu_reservations(host, u))
        return {
            u: {_text(e): int(m) for e, m in raw.items()}
            for u, raw in zip(uuids, pipe.execute(), strict=True)
        }

    # ------------------------------------------------------------------ reserve
    def reserve(
        self,
        engine_id: str,
        host: str,
        gpus: Sequence[tuple[str, int]],
        *,
        port_range: tuple[int, int],
        margin_mib: int,
        port: int | None = None,
        avoid_ports: Iterable[int] = (),
    ) -> Reservation:
        """Atomically reserve MiB on each GPU (uuid, MiB) and one port of ``host`` for an
        engine without a record. Raises ``ReservationConflict`` with the reason;
        nothing is reserved then."""
        req = ReserveRequest(
            host,
            tuple((u, int(m)) for u, m in gpus),
            port_range,
            margin_mib,
            port=port,
            avoid_ports=tuple(avoid_ports),
        )
        result = self.commit(engine_id, mode="none", reserve=req)
        assert result.port is not None
        return Reservation(engine_id, host, result.port, req.gpus)

    # ------------------------------------------------------------------ release
    def release(self, engine_id: str) -> bool:
        """Release everything ``engine_id`` holds. True only for the call that did it."""
        return self.commit(engine_id, mode="none", release=True).released

    def forget_host(self, host: str) -> None:
        """Drop a host's GPU capacity (its reservations are released one by one first)."""
        self.r.delete(keys.gpu_capacity(host), keys.capacity_published(host))

    # ------------------------------------------------------------------ reading
    def reservation(self, engine_id: str) -> Reservation | None:
        raw: dict[bytes, bytes] = self.r.hgetall(keys.engine_reservation(engine_id))  # type: ignore[assignment]
        if not raw:
            return None
        gpus = tuple((str(u), int(m)) for u, m in json.loads(raw[b"gpus"]))
        return Reservation(engine_id, raw[b"host"].decode(), int(raw[b"port"]), gpus)

    def reserved_engines(self) -> set[str]:
        return {_text(m) for m in self.r.smembers(keys.RESERVED_ENGINES)}

    def ports(self, host: str) -> dict[int, str]:
        raw: dict[bytes, bytes] = self.r.hgetall(keys.port_reservations(host))  # type: ignore[assignment]
        return {int(p): v.decode() for p, v in raw.items()}

    def is_empty(self) -> bool:
        """True when nothing at all is reserved (no engine, port or GPU MiB)."""
        if self.r.scard(keys.RESERVED_ENGINES):
            return False
        for pattern in (keys.GPU_RESERVATIONS_PREFIX + "*", keys.PORT_RESERVATIONS_PREFIX + "*"):
            for key in self.r.scan_iter(match=pattern, count=500):
                if self.r.hlen(key):
                    return False
        return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
