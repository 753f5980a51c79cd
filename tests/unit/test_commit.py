"""The one atomic write of a record and its reservation (``ledger._COMMIT``), on the
real server and on fakeredis."""

from __future__ import annotations

import threading

import pytest
import redis

from app.core.errors import ReservationConflict
from app.core.gpus import GpuCapacity
from app.core.models import EngineRecord, EngineState, GpuAssignment
from app.core.spec import EngineSpec
from app.state import keys
from app.state.ledger import Ledger, ReserveRequest, Unreserved
from app.state.registry import Registry, new_engine_id

S = EngineState
GB = 1024
RANGE = (8100, 8109)


def _setup(r: redis.Redis) -> tuple[Registry, Ledger]:
    led = Ledger(r)
    led.publish_capacity("a", [GpuCapacity("a", 0, "GPU-a0", 80 * GB, 0)])
    return Registry(r), led


def _req(gb: int, **kw: object) -> ReserveRequest:
    return ReserveRequest("a", (("GPU-a0", gb * GB),), RANGE, margin_mib=GB, **kw)  # type: ignore[arg-type]


def _new(reg: Registry, gb: int) -> EngineRecord:
    rec = EngineRecord(id=new_engine_id(), spec=EngineSpec(model="m"))
    rec.host, rec.address = "a", "127.0.0.1"
    rec.gpus = [GpuAssignment(0, "GPU-a0", gb * GB)]
    return reg.create(rec, reserve=_req(gb))


def test_create_with_reservation_writes_the_port_it_picked_into_the_record(
    any_redis: redis.Redis,
) -> None:
    reg, led = _setup(any_redis)
    rec = _new(reg, 10)
    stored = reg.get(rec.id)
    res = led.reservation(rec.id)
    assert res is not None and stored.port == res.port == rec.port == 8100
    assert stored.base_url == "http://127.0.0.1:8100"
    assert b"@@" not in any_redis.get(keys.engine(rec.id))  # type: ignore[operator]


def test_refused_reservation_writes_no_record(any_redis: redis.Redis) -> None:
    reg, led = _setup(any_redis)
    _new(reg, 70)
    with pytest.raises(ReservationConflict, match=r"GPU 0: 9\.0 GB free, 20\.0 GB needed"):
        _new(reg, 20)
    assert len(reg.engines()) == 1 and led.reserved_engines() == {reg.engines()[0].id}


@pytest.mark.parametrize("end", ["stopped", "failed-final", "deleted"])
def test_the_write_that_ends_an_engine_releases_its_room_once(
    any_redis: redis.Redis, end: str
) -> None:
    reg, led = _setup(any_redis)
    rec = _new(reg, 10)
    if end == "deleted":
        assert reg.delete(rec.id)
    else:

        def finish(r: EngineRecord) -> None:
            if end == "stopped":
                r.transition(S.STOPPING)
                r.transition(S.STOPPED)
            else:
                r.transition(S.FAILED)

        _, result = reg.commit(rec.id, finish)
        assert result.released
        _, again = reg.commit(rec.id, lambda r: None)
        assert not again.released  # exactly once
    assert led.is_empty()


def test_failed_with_a_restart_pending_keeps_its_room(any_redis: redis.Redis) -> None:
    reg, led = _setup(any_redis)
    rec = _new(reg, 10)

    def crashed(r: EngineRecord) -> None:
        r.transition(S.FAILED)
        r.next_restart_at = 1.0

    reg.update(rec.id, crashed)
    assert led.reservation(rec.id) is not None


def test_a_process_is_never_recorded_for_an_engine_whose_room_is_gone(
    any_redis: redis.Redis,
) -> None:
    reg, led = _setup(any_redis)
    rec = _new(reg, 10)
    led.release(rec.id)
    with pytest.raises(Unreserved):
        reg.update(rec.id, lambda r: r.transition(S.STARTING), require_reserved=True)
    assert reg.get(rec.id).state is S.PENDING


def test_reclaim_retakes_a_running_engines_room_before_capacity_is_back(
    any_redis: redis.Redis,
) -> None:
    reg, led = _setup(any_redis)
    rec = _new(reg, 10)
    any_redis.delete(keys.engine_reservation(rec.id), keys.gpu_reservations("a", "GPU-a0"))
    any_redis.delete(keys.port_reservations("a"), keys.gpu_capacity("a"))
    reg.update(rec.id, lambda r: None, reserve=_req(10, port=rec.port, reclaim=True))
    res = led.reservation(rec.id)
    assert res is not None and res.port == rec.port
    # Already held: a second reclaim is a no-op, not a conflict.
    reg.update(rec.id, lambda r: None, reserve=_req(10, port=rec.port, reclaim=True))


def test_capacity_is_published_only_while_the_named_engines_hold_their_room(
    any_redis: redis.Redis,
) -> None:
    reg, led = _setup(any_redis)
    rec = _new(reg, 10)
    cap = [GpuCapacity("a", 0, "GPU-a0", 80 * GB, 5 * GB)]
    assert led.publish_capacity("a", cap, held_by=[rec.id]) == []
    assert led.capacity("a")[0].outside_mib == 5 * GB
    led.release(rec.id)
    any_redis.delete(keys.gpu_capacity("a"), keys.capacity_published("a"))
    assert led.publish_capacity("a", cap, held_by=[rec.id]) == [rec.id]
    assert not led.has_capacity("a") and led.capacity("a") == []


def test_concurrent_writers_never_lose_an_update(real_redis: redis.Redis) -> None:
    reg, _ = _setup(real_redis)
    rec = _new(reg, 1)

    def bump() -> None:
        mine = Registry(real_redis)
        for _ in range(25):
            mine.update(rec.id, lambda r: setattr(r, "health_failures", r.health_failures + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.get(rec.id).health_failures == 100


# --------------------------------------------------------------- moving a reservation


def _two_gpus(r: redis.Redis) -> tuple[Registry, Ledger]:
    led = Ledger(r)
    led.publish_capacity(
        "a", [GpuCapacity("a", 0, "GPU-a0", 80 * GB, 0), GpuCapacity("a", 1, "GPU-a1", 80 * GB, 0)]
    )
    return Registry(r), led


def _on(uuid: str, gb: int) -> ReserveRequest:
    return ReserveRequest("a", ((uuid, gb * GB),), RANGE, margin_mib=GB, move=True)


def test_a_move_releases_the_old_room_and_takes_the_new_in_one_write(
    any_redis: redis.Redis,
) -> None:
    reg, led = _two_gpus(any_redis)
    rec = _new(reg, 10)  # 10 GB on GPU-a0, port 8100
    moved, result = reg.commit(rec.id, lambda r: None, reserve=_on("GPU-a1", 10))
    res = led.reservation(rec.id)
    assert res is not None and [u for u, _ in res.gpus] == ["GPU-a1"]
    assert led.gpu_reservations("a", ["GPU-a0"]).get("GPU-a0", {}) == {}
    assert led.gpu_reservations("a", ["GPU-a1"])["GPU-a1"] == {rec.id: 10 * GB}
    assert set(led.ports("a").values()) == {rec.id}  # one port, the new one
    assert moved.port == res.port
    assert not result.released  # it still holds room: nothing was given back


def test_a_move_counts_the_engines_own_room_as_free(any_redis: redis.Redis) -> None:
    reg, led = _two_gpus(any_redis)
    rec = _new(reg, 70)  # 70 of 79 usable GB on GPU-a0
    reg.commit(rec.id, lambda r: None, reserve=_on("GPU-a0", 75))  # grows in place
    assert led.gpu_reservations("a", ["GPU-a0"])["GPU-a0"] == {rec.id: 75 * GB}


def test_a_move_that_does_not_fit_changes_nothing(any_redis: redis.Redis) -> None:
    reg, led = _two_gpus(any_redis)
    rec = _new(reg, 10)
    other = EngineRecord(id=new_engine_id(), spec=EngineSpec(model="m"))
    reg.create(other, reserve=ReserveRequest("a", (("GPU-a1", 70 * GB),), RANGE, margin_mib=GB))
    before = led.reservation(rec.id)
    with pytest.raises(ReservationConflict, match="GPU 1"):
        reg.commit(rec.id, lambda r: None, reserve=_on("GPU-a1", 20))
    assert led.reservation(rec.id) == before
    assert led.gpu_reservations("a", ["GPU-a0"])["GPU-a0"] == {rec.id: 10 * GB}


def test_without_move_a_second_reservation_is_still_refused(any_redis: redis.Redis) -> None:
    reg, _ = _two_gpus(any_redis)
    rec = _new(reg, 10)
    with pytest.raises(ReservationConflict, match="already holds a reservation"):
        reg.commit(rec.id, lambda r: None, reserve=_req(10))


# --------------------------------------------------------------- eviction


def _running_on_demand(reg: Registry, gb: int) -> EngineRecord:
    """A RUNNING on-demand engine holding ``gb`` on GPU-a0."""
    rec = EngineRecord(id=new_engine_id(), spec=EngineSpec(model="m", on_demand=True))
    rec.host, rec.address = "a", "127.0.0.1"
    rec.gpus = [GpuAssignment(0, "GPU-a0", gb * GB)]
    rec = reg.create(rec, reserve=_req(gb))

    def run(r: EngineRecord) -> None:
        r.state, r.pid, r.running_since = S.RUNNING, 4242, 1.0

    return reg.update(rec.id, run)


def _evicting(reg: Registry, victim: str, gb: int) -> EngineRecord:
    rec = EngineRecord(id=new_engine_id(), spec=EngineSpec(model="m2"))
    rec.host, rec.address = "a", "127.0.0.1"
    rec.gpus = [GpuAssignment(0, "GPU-a0", gb * GB)]
    rec.waits_for = [victim]
    return reg.create(
        rec,
        reserve=_req(gb),
        evict=[(victim, lambda r: r.evict_for(rec.id, 99.0), ())],
    )


def test_an_eviction_hands_the_victims_room_to_the_new_engine_in_one_write(
    any_redis: redis.Redis,
) -> None:
    reg, led = _setup(any_redis)
    victim = _running_on_demand(reg, 50)
    with pytest.raises(ReservationConflict):  # without eviction there is no room
        _new(reg, 50)
    new = _evicting(reg, victim.id, 50)
    v = reg.get(victim.id)
    assert v.state is S.DRAINING and v.evicted_for == new.id and v.standby_after_stop
    assert led.reservation(victim.id) is None
    assert led.gpu_reservations("a", ["GPU-a0"])["GPU-a0"] == {new.id: 50 * GB}
    assert reg.get(new.id).waits_for == [victim.id]
    # its DRAINING is on its timeline, written by the same step
    assert any("-> DRAINING" in e["message"] for e in reg.events.list(victim.id))


def test_an_eviction_that_does_not_make_room_changes_nothing(any_redis: redis.Redis) -> None:
    reg, led = _setup(any_redis)
    victim = _running_on_demand(reg, 20)
    other = _new(reg, 50)  # not evictable: 79 - 20 - 50 = 9 GB free
    with pytest.raises(ReservationConflict, match="GPU 0"):
        _evicting(reg, victim.id, 40)  # 9 + 20 < 40
    assert reg.get(victim.id).state is S.RUNNING
    assert led.gpu_reservations("a", ["GPU-a0"])["GPU-a0"] == {
        victim.id: 20 * GB,
        other.id: 50 * GB,
    }
    assert len(reg.engines()) == 2  # the new record was not written either


def test_two_starts_evicting_the_same_engine_one_wins_never_both_lose(
    real_redis: redis.Redis,
) -> None:
    reg, led = _setup(real_redis)
    victim = _running_on_demand(reg, 50)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def start() -> None:
        barrier.wait()
        try:
            outcomes.append(_evicting(reg, victim.id, 50).id)
        except Exception as exc:  # the loser: the victim is no longer evictable
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("eng-")]
    assert len(winners) == 1, outcomes
    assert reg.get(victim.id).evicted_for == winners[0]
    assert led.gpu_reservations("a", ["GPU-a0"])["GPU-a0"] == {winners[0]: 50 * GB}
