"""The reservation ledger: GPU memory and ports per host, in Redis.

What it guarantees (each proved by a test against a real redis-server):

* **No over-commit.** A reservation is taken by one Lua script that, for every GPU it
  names, checks ``reserved by us + held outside + margin + request <= total`` and
  writes only if all of them fit. Redis runs a script atomically, so any number of
  API processes and workers reserving at once cannot interleave between the check
  and the write.
* **One port, one engine.** The same script takes the port, refusing one already
  held; a port stays held until ``release``.
* **All or nothing.** A refused reservation writes nothing.
* **Exactly-once release.** ``release`` deletes what the engine's reservation record
  names and the record itself in one script; a second call finds no record and
  returns ``False``, so callers racing to release (stop, prune, crash handling,
  rediscovery) learn which one of them actually released.

Capacity (total and outside-held MiB per GPU) is written by each host's worker from
its inventory; the margin is passed by the caller from settings.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from app.core.errors import ReservationConflict, ValidationError
from app.core.models import GpuCapacity
from app.core.state import keys

# KEYS: 1 capacity hash, 2 port hash, 3 engine reservation, 4 reserved-engines set,
#       5.. one reservation hash per GPU (same order as the GPU ARGV pairs)
# ARGV: 1 engine_id, 2 host, 3 margin MiB, 4 port low, 5 port high, 6 port (0 = any),
#       7 n_skip, then n_skip ports to avoid, then (uuid, MiB) per GPU
_RESERVE = r"""
local engine_id, host = ARGV[1], ARGV[2]
local margin, lo, hi, want = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6])
local n_skip = tonumber(ARGV[7])
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {'ERR', 'engine ' .. engine_id .. ' already holds a reservation'}
end
local skip = {}
for i = 1, n_skip do skip[tonumber(ARGV[7 + i])] = true end
local base = 7 + n_skip
local n_gpus = (#ARGV - base) / 2
local gpus = {}
for i = 1, n_gpus do
  local uuid, mib = ARGV[base + 2 * i - 1], tonumber(ARGV[base + 2 * i])
  local raw = redis.call('HGET', KEYS[1], uuid)
  if not raw then
    return {'ERR', 'host ' .. host .. ': GPU ' .. uuid .. ' is not in its inventory'}
  end
  local cap = cjson.decode(raw)
  local reserved = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[4 + i])) do reserved = reserved + tonumber(v) end
  local free = cap.total_mib - cap.outside_mib - margin - reserved
  if mib > free then
    if free < 0 then free = 0 end
    return {'ERR', string.format('host %s, GPU %d: %.1f GB free, %.1f GB needed',
      host, cap.index, free / 1024, mib / 1024)}
  end
  gpus[#gpus + 1] = {uuid, mib}
end
local port = nil
if want ~= 0 then
  local holder = redis.call('HGET', KEYS[2], tostring(want))
  if holder then
    return {'ERR', string.format('host %s: port %d is held by engine %s', host, want, holder)}
  end
  port = want
else
  local taken = {}
  for _, p in ipairs(redis.call('HKEYS', KEYS[2])) do taken[tonumber(p)] = true end
  for p = lo, hi do
    if not taken[p] and not skip[p] then port = p; break end
  end
  if not port then
    return {'ERR', string.format('host %s: no free port in %d-%d', host, lo, hi)}
  end
end
for i, g in ipairs(gpus) do redis.call('HSET', KEYS[4 + i], engine_id, g[2]) end
redis.call('HSET', KEYS[2], tostring(port), engine_id)
redis.call('HSET', KEYS[3], 'host', host, 'port', port, 'gpus', cjson.encode(gpus))
redis.call('SADD', KEYS[4], engine_id)
return {'OK', tostring(port)}
"""

# KEYS: 1 engine reservation, 2 reserved-engines set
# ARGV: 1 engine_id, 2 GPU hash prefix, 3 port hash prefix
_RELEASE = r"""
local engine_id = ARGV[1]
local host = redis.call('HGET', KEYS[1], 'host')
if not host then
  redis.call('SREM', KEYS[2], engine_id)
  return 0
end
local gpus = cjson.decode(redis.call('HGET', KEYS[1], 'gpus') or '[]')
for _, g in ipairs(gpus) do
  redis.call('HDEL', ARGV[2] .. host .. ':' .. g[1], engine_id)
end
local port = redis.call('HGET', KEYS[1], 'port')
local ports = ARGV[3] .. host
if port and redis.call('HGET', ports, port) == engine_id then
  redis.call('HDEL', ports, port)
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], engine_id)
return 1
"""


@dataclass(frozen=True)
class Reservation:
    engine_id: str
    host: str
    port: int
    gpus: tuple[tuple[str, int], ...]  # (uuid, MiB)


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
    """GPU-memory and port reservations per host. See the module docstring."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)

    # ------------------------------------------------------------------ capacity
    def publish_capacity(self, host: str, gpus: Iterable[GpuCapacity]) -> None:
        """Record what a host's worker measured: total and outside-held MiB per GPU.

        GPUs no longer in the inventory are dropped; reservations are untouched.
        """
        gpus = list(gpus)
        key = keys.gpu_capacity(host)
        mapping = {
            g.uuid: json.dumps(
                {"index": g.index, "total_mib": g.total_mib, "outside_mib": g.outside_mib}
            )
            for g in gpus
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        if mapping:
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
        pipe.execute()

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
        port_probe: Callable[[int], bool] | None = None,
        avoid_ports: Iterable[int] = (),
        max_port_tries: int = 16,
    ) -> Reservation:
        """Atomically reserve MiB on each GPU (uuid, MiB) and one port of ``host``.

        ``port`` asks for a given port, else the lowest free one in ``port_range``.
        ``port_probe`` (run on the host itself) checks the port is really bindable: a
        port some other program listens on is skipped (or refused, when asked for).
        ``avoid_ports`` are never picked automatically (e.g. ports the host's heartbeat
        saw other programs listen on).
        Raises ``ReservationConflict`` with the reason; nothing is reserved then.
        """
        lo, hi = port_range
        if port is not None and not lo <= port <= hi:
            raise ValidationError(
                f"port: {port} is outside host {host}'s range {lo}-{hi}", field="port"
            )
        for uuid, mib in gpus:
            if mib <= 0:
                raise ValidationError(
                    f"required_memory_gb: reservation on GPU {uuid} must be > 0 MiB, got {mib}",
                    field="required_memory_gb",
                )
        if len({u for u, _ in gpus}) != len(gpus):
            raise ValidationError("gpu_ids: the same GPU twice", field="gpu_ids")
        skip: list[int] = sorted({p for p in avoid_ports if lo <= p <= hi})
        for _ in range(max_port_tries):
            res = self._reserve_once(engine_id, host, gpus, lo, hi, port, skip, margin_mib)
            if port_probe is None or port_probe(res.port):
                return res
            self.release(engine_id)
            if port is not None:
                raise ReservationConflict(
                    f"host {host}: port {port} is in use by a process that is not ours"
                )
            skip.append(res.port)
        raise ReservationConflict(
            f"host {host}: {max_port_tries} free ports in a row were in use by other processes"
        )

    def _reserve_once(
        self,
        engine_id: str,
        host: str,
        gpus: Sequence[tuple[str, int]],
        lo: int,
        hi: int,
        port: int | None,
        skip: list[int],
        margin_mib: int,
    ) -> Reservation:
        keys_ = [
            keys.gpu_capacity(host),
            keys.port_reservations(host),
            keys.engine_reservation(engine_id),
            keys.RESERVED_ENGINES,
            *(keys.gpu_reservations(host, u) for u, _ in gpus),
        ]
        argv: list[Any] = [engine_id, host, margin_mib, lo, hi, port or 0, len(skip), *skip]
        for u, mib in gpus:
            argv += [u, int(mib)]
        status, detail = self._reserve(keys=keys_, args=argv)
        status, detail = _text(status), _text(detail)
        if status != "OK":
            raise ReservationConflict(detail)
        return Reservation(engine_id, host, int(detail), tuple((u, int(m)) for u, m in gpus))

    # ------------------------------------------------------------------ release
    def release(self, engine_id: str) -> bool:
        """Release everything ``engine_id`` holds. True only for the call that did it."""
        done = self._release(
            keys=[keys.engine_reservation(engine_id), keys.RESERVED_ENGINES],
            args=[engine_id, keys.GPU_RESERVATIONS_PREFIX, keys.PORT_RESERVATIONS_PREFIX],
        )
        return bool(done)

    def forget_host(self, host: str) -> None:
        """Drop a host's GPU capacity (its reservations are released one by one first)."""
        self.r.delete(keys.gpu_capacity(host))

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
