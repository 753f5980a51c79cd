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
* a drain (``app.state.gateway_report``) compares the number of the write that made the
  engine DRAINING with the number up to which each gateway process has heard every
  write: no clock is compared across machines.

An absent counter (a new or a lost Redis) starts again from Redis' clock in
microseconds, so a number handed out before the loss is never handed out again for a
different write (unless Redis' clock went back by more than the writes it saw).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.client import PubSub

from app.state import keys
from app.state.lua_scripts import lua_script

# Lua, prepended to the commit script: finish_write(...) numbers and announces a write
# (``lua/finish_write.lua``).
FINISH_WRITE_LUA = lua_script("finish_write.lua")

# A waiter that heard nothing reads again this often (a lost message, a reconnect, a
# write of the ledger alone, which is not announced): a safety net, not the way
# changes are learnt.
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
    with change_notices(client, deadline) as pubsub:
        seq = current_seq(client)
        while seq == after and (left := deadline - time.monotonic()) > 0:
            msg = pubsub.get_message(timeout=min(left, WAIT_REREAD_S))
            if msg is None or msg["type"] == "message":
                seq = current_seq(client)
        return seq


@contextmanager
def change_notices(client: redis.Redis, deadline: float) -> Iterator[PubSub]:
    """A subscription to ``keys.ENGINE_CHANGES``, handed over once Redis confirmed it
    (or at ``deadline``, a ``time.monotonic()`` value): what is read after that misses
    no write, since every later one is announced on it. Closed on leaving."""
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(keys.ENGINE_CHANGES)
        while time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg["type"] == "subscribe":
                break
        yield pubsub
    finally:
        pubsub.close()


def notice_seq(notice: dict[str, Any]) -> int | None:
    """The number in a change notice (``keys.ENGINE_CHANGES``), if it has one."""
    seq = notice.get("seq")
    return int(seq) if isinstance(seq, int) else None


__all__ = [
    "FINISH_WRITE_LUA",
    "KEY_NAMES",
    "WAIT_REREAD_S",
    "change_notices",
    "current_seq",
    "notice_seq",
    "record_seq",
    "seq_of",
    "wait_for_write",
]
