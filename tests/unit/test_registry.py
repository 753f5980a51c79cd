"""Engine records and host heartbeats, on the real server (and fakeredis)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from app.core.errors import IllegalTransition, NotFoundError
from app.core.gpus import GpuInfo
from app.core.models import EngineRecord, EngineState, HostRecord
from app.core.spec import EngineKind, EngineSpec
from app.state.registry import Registry, new_engine_id

S = EngineState


def _rec(model: str = "m", **kw: object) -> EngineRecord:
    return EngineRecord(id=new_engine_id(), spec=EngineSpec(model=model, **kw))  # type: ignore[arg-type]


def test_create_get_and_refuse_duplicate(any_redis: redis.Redis) -> None:
    reg = Registry(any_redis)
    rec = reg.create(_rec())
    assert reg.get(rec.id) == rec
    with pytest.raises(ValueError, match="already exists"):
        reg.create(rec)
    with pytest.raises(NotFoundError, match="not found"):
        reg.get("eng-nope")


def test_list_filters(any_redis: redis.Redis) -> None:
    reg = Registry(any_redis)
    a = reg.create(_rec("llm-a", label="x"))
    b = reg.create(_rec("emb", kind=EngineKind.EMBEDDING))
    reg.transition(a.id, S.STARTING, host="h1")
    assert [r.id for r in reg.engines()] == [a.id, b.id]
    assert [r.id for r in reg.engines(state=S.STARTING)] == [a.id]
    assert [r.id for r in reg.engines(state=[S.PENDING, S.STARTING])] == [a.id, b.id]
    assert [r.id for r in reg.engines(host="h1")] == [a.id]
    assert [r.id for r in reg.engines(kind="embedding")] == [b.id]
    assert [r.id for r in reg.engines(label="x")] == [a.id]


def test_transition_is_checked_and_nothing_written_when_illegal(any_redis: redis.Redis) -> None:
    reg = Registry(any_redis)
    rec = reg.create(_rec())
    with pytest.raises(IllegalTransition):
        reg.transition(rec.id, S.RUNNING, pid=123)
    stored = reg.get(rec.id)
    assert stored.state is S.PENDING and stored.pid is None


def test_concurrent_updates_lose_nothing(real_redis: redis.Redis) -> None:
    reg = Registry(real_redis)
    rec = reg.create(_rec())

    def bump() -> None:
        mine = Registry(real_redis)
        for _ in range(25):
            mine.update(rec.id, lambda r: setattr(r, "restart_count", r.restart_count + 1))

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.get(rec.id).restart_count == 200


def test_only_one_of_racing_stoppers_wins(real_redis: redis.Redis) -> None:
    """STOPPING -> STOPPED may happen once; the losers get IllegalTransition."""
    reg = Registry(real_redis)
    rec = reg.create(_rec())
    reg.transition(rec.id, S.STARTING)
    reg.transition(rec.id, S.RUNNING)
    reg.transition(rec.id, S.STOPPING)
    wins: list[str] = []

    def stop(name: str) -> None:
        try:
            Registry(real_redis).transition(rec.id, S.STOPPED)
            wins.append(name)
        except IllegalTransition:
            pass

    threads = [threading.Thread(target=stop, args=(f"t{i}",)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert reg.get(rec.id).state is S.STOPPED


def test_delete(any_redis: redis.Redis) -> None:
    reg = Registry(any_redis)
    rec = reg.create(_rec())
    assert reg.delete(rec.id) is True
    assert reg.delete(rec.id) is False
    assert reg.engines() == []


def test_host_goes_down_when_heartbeat_expires(real_redis: redis.Redis) -> None:
    reg = Registry(real_redis)
    gpu = GpuInfo(0, "GPU-1", "H100", 81559, 80000)
    reg.put_host(HostRecord("a", "10.0.0.1", (8100, 8199), gpus=[gpu]), ttl_s=0.3)
    reg.put_host(HostRecord("b", "10.0.0.2", (8100, 8199)), ttl_s=30)
    assert [(h.name, h.up) for h in reg.hosts()] == [("a", True), ("b", True)]
    assert reg.hosts()[0].gpus == [gpu]
    time.sleep(0.5)
    assert [(h.name, h.up) for h in reg.hosts()] == [("a", False), ("b", True)]
    down = reg.host("a")
    assert down is not None and down.gpus == [gpu]  # last known inventory kept
    reg.forget_host("a")
    assert reg.host("a") is None


def test_forgetting_a_host_forgets_its_model_facts(any_redis: redis.Redis) -> None:
    from app.core.memory.facts import ModelFacts
    from app.state.model_facts import host_model_facts, publish_model_facts

    reg = Registry(any_redis)
    reg.put_host(HostRecord("a", "10.0.0.1", (8100, 8199)), ttl_s=30)
    publish_model_facts(any_redis, "a", {"org/m": ModelFacts("org/m", "/models/m", layers=2)})
    publish_model_facts(any_redis, "b", {"org/m": ModelFacts("org/m", "/models/m", layers=2)})
    reg.forget_host("a")
    assert host_model_facts(any_redis, "a") == {}
    assert list(host_model_facts(any_redis, "b")) == ["org/m"]  # another host's are kept
