"""The numbering of writes (``app.state.write_seq``) by the one record write script, on
the real server and on fakeredis."""

from __future__ import annotations

import json

import redis

from app.core.gpus import GpuCapacity
from app.core.models import EngineRecord, EngineState, GpuAssignment
from app.core.spec import EngineSpec
from app.state import keys
from app.state.ledger import Ledger, ReserveRequest
from app.state.registry import Registry
from app.state.write_seq import current_seq, record_seq

S = EngineState
GB = 1024


def _setup(r: redis.Redis) -> Registry:
    Ledger(r).publish_capacity("a", [GpuCapacity("a", 0, "GPU-a0", 80 * GB, 0)])
    return Registry(r)


def _new(reg: Registry, eid: str) -> EngineRecord:
    rec = EngineRecord(id=eid, spec=EngineSpec(model="m"), host="a", address="127.0.0.1")
    rec.gpus = [GpuAssignment(0, "GPU-a0", GB)]
    req = ReserveRequest("a", (("GPU-a0", GB),), (8100, 8109), margin_mib=0)
    return reg.create(rec, reserve=req)


def test_every_write_gets_the_next_number_and_the_record_keeps_its_last(
    any_redis: redis.Redis,
) -> None:
    reg = _setup(any_redis)
    _new(reg, "eng-a")
    first = current_seq(any_redis)
    assert record_seq(any_redis, "eng-a") == first
    _new(reg, "eng-b")
    _, result = reg.commit("eng-a", lambda r: r.transition(S.STARTING))
    assert result.seq == first + 2 == current_seq(any_redis)
    assert record_seq(any_redis, "eng-a") == first + 2
    assert record_seq(any_redis, "eng-b") == first + 1
    reg.delete("eng-b")
    assert record_seq(any_redis, "eng-b") is None
    assert current_seq(any_redis) == first + 3


def test_the_ledger_number_moves_only_when_a_reservation_changes(any_redis: redis.Redis) -> None:
    reg = _setup(any_redis)
    _new(reg, "eng-a")
    taken = int(any_redis.get(keys.LEDGER_SEQ))  # type: ignore[arg-type]
    reg.update("eng-a", lambda r: r.transition(S.STARTING))  # the record only
    assert int(any_redis.get(keys.LEDGER_SEQ)) == taken  # type: ignore[arg-type]
    _, result = reg.commit("eng-a", lambda r: r.request_stop())  # STOPPING keeps its room
    assert int(any_redis.get(keys.LEDGER_SEQ)) == taken  # type: ignore[arg-type]
    _, result = reg.commit("eng-a", lambda r: r.transition(S.STOPPED))  # released
    assert result.released
    assert int(any_redis.get(keys.LEDGER_SEQ)) == result.seq  # type: ignore[arg-type]
    # a ledger-only write that changes nothing is not numbered
    before = current_seq(any_redis)
    assert Ledger(any_redis).release("eng-a") is False
    assert current_seq(any_redis) == before


def test_numbers_go_on_past_the_old_ones_after_redis_lost_everything(
    any_redis: redis.Redis,
) -> None:
    reg = _setup(any_redis)
    _new(reg, "eng-a")
    for _ in range(50):
        reg.update("eng-a", lambda r: setattr(r, "health_failures", r.health_failures + 1))
    old = current_seq(any_redis)
    any_redis.flushall()
    reg = _setup(any_redis)
    _new(reg, "eng-a")
    assert current_seq(any_redis) > old


def test_the_change_notice_carries_the_number(any_redis: redis.Redis) -> None:
    reg = _setup(any_redis)
    sub = any_redis.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.ENGINE_CHANGES)
    sub.get_message(timeout=1)
    _new(reg, "eng-a")
    msg = None
    for _ in range(20):
        msg = sub.get_message(timeout=0.1)
        if msg is not None:
            break
    sub.close()
    assert msg is not None
    notice = json.loads(msg["data"])
    assert notice == {"id": "eng-a", "state": "PENDING", "seq": current_seq(any_redis)}
