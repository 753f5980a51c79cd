"""The numbering of writes: one counter, ``keys.WRITE_SEQ``, read on Redis' side only.

The record write script (``app.state.ledger``'s ``_COMMIT``) ends with ``finish_write``
(``FINISH_WRITE_LUA``): when it wrote a record or a reservation it bumps the counter,
files the number under each record it wrote (``keys.RECORD_SEQS``; a deleted one is
dropped) and, when a reservation changed, as ``keys.LEDGER_SEQ``; then it publishes the
change notice with the number in it (``{"id", "state", "seq"}``). Redis runs scripts
one at a time, so numbers follow the order in which writes happened, whoever wrote
them and whatever their machines' clocks say. What uses them:

* status views (``app.state.snapshot``) read only the records written since the number
  they last read, and the reservations only when ``LEDGER_SEQ`` moved;
* a drain (``app.state.inflight``) compares the number of the write that made the
  engine DRAINING with the number up to which each gateway process has heard every
  write: no clock is compared across machines.

An absent counter (a new or a lost Redis) starts again from Redis' clock in
microseconds, so a number handed out before the loss is never handed out again for a
different write (unless Redis' clock went back by more than the writes it saw).
"""

from __future__ import annotations

import time
from typing import Any

import redis

from app.state import keys

# Lua, prepended to the commit script. finish_write(K, op, mode, eid, victims,
# released): ``victims`` is a set of ids of other records written in the same step
# (evictions); returns the number of this write as a string ('' when it wrote nothing).
FINISH_WRITE_LUA = r"""
local function finish_write(K, op, mode, eid, victims, released)
  local seq = ''
  local ledger_changed = op.reserve ~= nil or released == 1
  if mode ~= 'none' or ledger_changed then
    local n = redis.call('INCR', K.seq)
    if n == 1 then  -- absent (a new or a lost Redis): go on from its clock, never back
      local t = redis.call('TIME')
      redis.call('SET', K.seq, t[1] .. string.format('%06d', tonumber(t[2])))
      n = redis.call('INCR', K.seq)
    end
    seq = string.format('%d', n)  -- not tostring(n): that keeps 14 digits only
    if mode == 'delete' then
      redis.call('ZREM', K.record_seqs, eid)
    elseif mode ~= 'none' then
      redis.call('ZADD', K.record_seqs, seq, eid)
    end
    for vid, _ in pairs(victims or {}) do redis.call('ZADD', K.record_seqs, seq, vid) end
    if ledger_changed then redis.call('SET', K.ledger_seq, seq) end
  end
  if op.notify then
    local notice = op.notify
    if seq ~= '' then notice = string.sub(notice, 1, -2) .. ', "seq": ' .. seq .. '}' end
    redis.call('PUBLISH', K.changes, notice)
  end
  return seq
end
"""

# A waiter that heard nothing reads the number again this often.
WAIT_REREAD_S = 2.0

KEY_NAMES: dict[str, str] = {
    "seq": keys.WRITE_SEQ,
    "record_seqs": keys.RECORD_SEQS,
    "ledger_seq": keys.LEDGER_SEQ,
}


def seq_of(reply: Any) -> int | None:
    """A number as the scripts return it (a string; '' or nothing: none)."""
    if isinstance(reply, list | tuple):
        reply = reply[0] if reply else None
    text = reply.decode() if isinstance(reply, bytes) else reply
    return int(text) if text else None


def current_seq(client: redis.Redis) -> int:
    """The number of the last write (0 when Redis has none)."""
    return seq_of(client.get(keys.WRITE_SEQ)) or 0


def record_seq(client: redis.Redis, engine_id: str) -> int | None:
    """The number of the last write of ``engine_id``'s record (None: no such record,
    or one written without a number)."""
    score = client.zscore(keys.RECORD_SEQS, engine_id)
    return None if score is None else int(score)


def wait_for_write(client: redis.Redis, after: int, timeout_s: float) -> int:
    """The number of the last write as soon as it is not ``after`` (something was
    written since), else when ``timeout_s`` ran out.

    Event-driven as ``Registry.wait``: subscribe to ``keys.ENGINE_CHANGES`` first, then
    read the number, then read it again only when a write is announced (or after
    ``WAIT_REREAD_S`` of silence: a write of the ledger alone is not announced)."""
    deadline = time.monotonic() + timeout_s
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(keys.ENGINE_CHANGES)
        # Read only once the subscription is confirmed: no write can fall between.
        while time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg["type"] == "subscribe":
                break
        seq = current_seq(client)
        while seq == after and (left := deadline - time.monotonic()) > 0:
            msg = pubsub.get_message(timeout=min(left, WAIT_REREAD_S))
            if msg is None or msg["type"] == "message":
                seq = current_seq(client)
        return seq
    finally:
        pubsub.close()


def notice_seq(notice: dict[str, Any]) -> int | None:
    """The number in a change notice (``keys.ENGINE_CHANGES``), if it has one."""
    seq = notice.get("seq")
    return int(seq) if isinstance(seq, int) else None


__all__ = [
    "FINISH_WRITE_LUA",
    "KEY_NAMES",
    "current_seq",
    "notice_seq",
    "record_seq",
    "seq_of",
    "wait_for_write",
]
