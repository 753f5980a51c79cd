"""Beat: its single-instance lock (atomic renew, a lost lock stops it) and the LOST
marking of DOWN hosts' engines. On the real server: the lock is Lua compare-and-set."""

from __future__ import annotations

import time
from pathlib import Path
from unittest import mock

import pytest
import redis

from app.core.models import EngineRecord, EngineState, HostRecord
from app.core.spec import EngineSpec
from app.settings import Settings
from app.state import keys
from app.state.locks import BEAT_LOCK_TTL_S, BeatLock
from app.state.registry import Registry, new_engine_id
from workers import beat_scheduler
from workers.beat_scheduler import SagellmScheduler, mark_lost_engines
from workers.celery_app import make_celery

S = EngineState


def _engine(reg: Registry, host: str, state: EngineState) -> EngineRecord:
    rec = reg.create(EngineRecord(id=new_engine_id(), spec=EngineSpec(model="m")))
    path = {
        S.STARTING: [S.STARTING],
        S.RUNNING: [S.STARTING, S.RUNNING],
        S.STOPPING: [S.STARTING, S.RUNNING, S.STOPPING],
    }[state]
    for step in path:
        rec = reg.transition(rec.id, step, host=host)
    return rec


# -------------------------------------------------------------------- LOST marking
def test_stopping_engine_of_a_down_host_stays_stopping(real_redis: redis.Redis) -> None:
    """A stop requested while the host is down must not be forgotten (LOST -> RUNNING
    when the host returns): STOPPING stays STOPPING, the other live states go LOST."""
    reg = Registry(real_redis)
    reg.put_host(HostRecord("down", "10.0.0.1", (8100, 8199)), ttl_s=30)
    reg.put_host(HostRecord("up", "10.0.0.2", (8100, 8199)), ttl_s=30)
    stopping = _engine(reg, "down", S.STOPPING)
    running = _engine(reg, "down", S.RUNNING)
    starting = _engine(reg, "down", S.STARTING)
    elsewhere = _engine(reg, "up", S.RUNNING)
    real_redis.delete(keys.host("down"))  # its heartbeat expired
    assert {h.name: h.up for h in reg.hosts()} == {"down": False, "up": True}

    lost = mark_lost_engines(reg)

    assert reg.get(stopping.id).state is S.STOPPING
    assert reg.get(running.id).state is S.LOST
    assert reg.get(starting.id).state is S.LOST
    assert reg.get(elsewhere.id).state is S.RUNNING
    assert sorted(lost) == sorted([running.id, starting.id])


def test_stopping_engine_survives_a_heartbeat_that_expires_by_ttl(real_redis: redis.Redis) -> None:
    reg = Registry(real_redis)
    reg.put_host(HostRecord("h", "10.0.0.1", (8100, 8199)), ttl_s=0.2)
    stopping = _engine(reg, "h", S.STOPPING)
    time.sleep(0.4)
    assert [h.up for h in reg.hosts()] == [False]
    assert mark_lost_engines(reg) == []
    assert reg.get(stopping.id).state is S.STOPPING


# -------------------------------------------------------------------- the lock
def test_only_one_beat_holds_the_lock_and_release_frees_it(real_redis: redis.Redis) -> None:
    first, second = BeatLock(real_redis), BeatLock(real_redis)
    assert first.acquire() is True
    assert second.acquire() is False
    assert real_redis.get(keys.BEAT_LOCK) == first.token
    ttl = real_redis.pttl(keys.BEAT_LOCK)
    assert 0 < ttl <= BEAT_LOCK_TTL_S * 1000
    first.release()
    assert real_redis.exists(keys.BEAT_LOCK) == 0
    assert second.acquire() is True


def test_renew_extends_the_ttl_while_the_lock_is_ours(real_redis: redis.Redis) -> None:
    lock = BeatLock(real_redis, ttl_s=5)
    assert lock.acquire()
    real_redis.pexpire(keys.BEAT_LOCK, 1000)
    assert lock.renew() is True
    assert real_redis.pttl(keys.BEAT_LOCK) > 4000
    assert not lock.lost.is_set()


def test_renew_after_another_token_took_the_key_reports_lost_and_leaves_it(
    real_redis: redis.Redis,
) -> None:
    lock = BeatLock(real_redis)
    assert lock.acquire()
    real_redis.set(keys.BEAT_LOCK, b"another-beat", ex=60)

    assert lock.renew() is False
    assert lock.lost.is_set()
    assert real_redis.get(keys.BEAT_LOCK) == b"another-beat"
    assert 55_000 < real_redis.pttl(keys.BEAT_LOCK) <= 60_000  # TTL not touched either
    lock.release()  # must not delete the other beat's lock
    assert real_redis.get(keys.BEAT_LOCK) == b"another-beat"


def test_renew_after_the_key_vanished_reports_lost_and_does_not_retake_it(
    real_redis: redis.Redis,
) -> None:
    """Another beat may have started meanwhile: never silently take the key again."""
    lock = BeatLock(real_redis)
    assert lock.acquire()
    real_redis.delete(keys.BEAT_LOCK)

    assert lock.renew() is False
    assert lock.lost.is_set()
    assert real_redis.exists(keys.BEAT_LOCK) == 0


def test_renew_after_the_key_expired_reports_lost(real_redis: redis.Redis) -> None:
    lock = BeatLock(real_redis, ttl_s=0.2)
    assert lock.acquire()
    time.sleep(0.4)
    assert lock.renew() is False
    assert lock.lost.is_set()
    assert real_redis.exists(keys.BEAT_LOCK) == 0


def test_renewing_thread_notices_the_loss_and_calls_on_lost(real_redis: redis.Redis) -> None:
    called: list[str] = []
    lock = BeatLock(real_redis, ttl_s=3, renew_every_s=0.1, on_lost=called.append)
    assert lock.acquire()
    lock.start_renewing()
    try:
        time.sleep(0.3)
        assert not lock.lost.is_set()
        real_redis.set(keys.BEAT_LOCK, b"another-beat")
        assert lock.lost.wait(2)
        deadline = time.monotonic() + 2
        while not called and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(called) == 1 and "beat lost its lock" in called[0]
        assert real_redis.get(keys.BEAT_LOCK) == b"another-beat"
    finally:
        lock.release()


def test_renew_that_cannot_reach_redis_for_a_whole_ttl_reports_lost(
    real_redis: redis.Redis,
) -> None:
    lock = BeatLock(real_redis, ttl_s=0.3)
    assert lock.acquire()
    with mock.patch.object(
        lock._lock, "reacquire", side_effect=redis.ConnectionError("Redis is down")
    ):
        assert lock.renew() is True  # within the TTL: keep trying
        assert not lock.lost.is_set()
        time.sleep(0.4)
        assert lock.renew() is False
    assert lock.lost.is_set()


# -------------------------------------------------------------------- the scheduler
@pytest.fixture
def scheduler(real_redis: redis.Redis, tmp_path: Path) -> SagellmScheduler:
    sched = SagellmScheduler(
        app=make_celery(Settings.from_env({})),
        schedule_filename=str(tmp_path / "celerybeat-schedule"),
        lazy=True,
    )
    sched._registry = Registry(real_redis)
    return sched


def test_tick_of_a_beat_that_lost_its_lock_exits_before_doing_anything(
    real_redis: redis.Redis, scheduler: SagellmScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = BeatLock(real_redis)
    assert lock.acquire()
    monkeypatch.setattr(beat_scheduler, "_held_lock", lock)
    mark = mock.Mock(return_value=[])
    schedule = mock.Mock(return_value=1.0)
    monkeypatch.setattr(beat_scheduler, "mark_lost_engines", mark)
    monkeypatch.setattr(beat_scheduler.PersistentScheduler, "tick", schedule)

    scheduler._last = 0.0
    assert scheduler.tick() == 1.0  # held: it marks and schedules
    assert mark.call_count == 1 and schedule.call_count == 1

    real_redis.set(keys.BEAT_LOCK, b"another-beat")
    lock.renew()
    scheduler._last = 0.0  # the LOST marking would be due
    with pytest.raises(SystemExit) as exc:
        scheduler.tick()
    assert exc.value.code != 0
    assert mark.call_count == 1 and schedule.call_count == 1  # nothing more


def test_tick_sees_the_lock_held_by_the_process(
    real_redis: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler Celery builds finds the lock the `beat` command took."""
    lock = BeatLock(real_redis)
    assert lock.acquire()
    monkeypatch.setattr(beat_scheduler, "_held_lock", None)
    beat_scheduler.hold(lock)
    sched = SagellmScheduler(
        app=make_celery(Settings.from_env({})),
        schedule_filename=str(tmp_path / "celerybeat-schedule"),
        lazy=True,
    )
    lock.lost.set()
    monkeypatch.setattr(beat_scheduler, "mark_lost_engines", mock.Mock())
    monkeypatch.setattr(beat_scheduler.PersistentScheduler, "tick", mock.Mock(return_value=1.0))
    with pytest.raises(SystemExit):
        sched.tick()
    beat_scheduler.mark_lost_engines.assert_not_called()  # type: ignore[attr-defined]
