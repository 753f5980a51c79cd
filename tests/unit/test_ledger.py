"""Ledger behaviour, on the real redis-server (and again on fakeredis for speed)."""

from __future__ import annotations

import threading

import pytest
import redis

from app.core.errors import ReservationConflict, ValidationError
from app.core.gpus import GpuCapacity
from app.state.ledger import Ledger

GB = 1024
RANGE = (8100, 8109)


def _ledger(client: redis.Redis, gpus: int = 2, total_gb: int = 80, outside_gb: int = 0) -> Ledger:
    led = Ledger(client)
    led.publish_capacity(
        "a",
        [GpuCapacity("a", i, f"GPU-a{i}", total_gb * GB, outside_gb * GB) for i in range(gpus)],
    )
    return led


def test_reserve_takes_memory_and_lowest_free_port(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis)
    res = led.reserve("e1", "a", [("GPU-a0", 30 * GB)], port_range=RANGE, margin_mib=GB)
    assert res.port == 8100
    caps = {g.uuid: g for g in led.capacity("a")}
    assert caps["GPU-a0"].reserved_mib == 30 * GB
    assert caps["GPU-a1"].reserved_mib == 0
    assert led.ports("a") == {8100: "e1"}
    res2 = led.reserve("e2", "a", [], port_range=RANGE, margin_mib=GB)
    assert res2.port == 8101


def test_refusal_names_host_gpu_free_and_needed_and_reserves_nothing(
    any_redis: redis.Redis,
) -> None:
    led = _ledger(any_redis, outside_gb=10)
    led.reserve("e1", "a", [("GPU-a0", 40 * GB)], port_range=RANGE, margin_mib=GB)
    # GPU 0: 80 total - 10 outside - 1 margin - 40 reserved = 29 GB free
    with pytest.raises(ReservationConflict, match=r"host a, GPU 0: 29\.0 GB free, 33\.0 GB needed"):
        led.reserve(
            "e2", "a", [("GPU-a1", 10 * GB), ("GPU-a0", 33 * GB)], port_range=RANGE, margin_mib=GB
        )
    # all or nothing: GPU 1 was not touched, no port taken
    assert {g.index: g.reserved_mib for g in led.capacity("a")} == {0: 40 * GB, 1: 0}
    assert led.ports("a") == {8100: "e1"}
    assert led.reservation("e2") is None


def test_exact_fit_is_allowed_one_more_mib_is_not(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis, gpus=1)
    led.reserve("e1", "a", [("GPU-a0", 79 * GB)], port_range=RANGE, margin_mib=GB)
    with pytest.raises(ReservationConflict, match=r"0\.0 GB free"):
        led.reserve("e2", "a", [("GPU-a0", 1)], port_range=RANGE, margin_mib=GB)


def test_release_is_idempotent_and_returns_true_once(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis)
    led.reserve(
        "e1", "a", [("GPU-a0", 10 * GB), ("GPU-a1", 10 * GB)], port_range=RANGE, margin_mib=GB
    )
    assert led.release("e1") is True
    assert led.release("e1") is False
    assert led.is_empty()
    assert all(g.reserved_mib == 0 for g in led.capacity("a"))


def test_concurrent_release_releases_exactly_once(real_redis: redis.Redis) -> None:
    led = _ledger(real_redis)
    for i in range(20):
        led.reserve(f"e{i}", "a", [("GPU-a0", GB)], port_range=(8100, 8199), margin_mib=0)
    results: list[bool] = []
    lock = threading.Lock()

    def release_all() -> None:
        mine = Ledger(real_redis)
        for i in range(20):
            done = mine.release(f"e{i}")
            with lock:
                results.append(done)

    threads = [threading.Thread(target=release_all) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 20
    assert led.is_empty()


def test_same_engine_cannot_reserve_twice(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis)
    led.reserve("e1", "a", [("GPU-a0", GB)], port_range=RANGE, margin_mib=0)
    with pytest.raises(ReservationConflict, match="already holds"):
        led.reserve("e1", "a", [("GPU-a1", GB)], port_range=RANGE, margin_mib=0)


def test_requested_port_held_by_another_engine_is_refused(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis)
    led.reserve("e1", "a", [], port=8105, port_range=RANGE, margin_mib=0)
    with pytest.raises(ReservationConflict, match="port 8105 is held by engine e1"):
        led.reserve("e2", "a", [], port=8105, port_range=RANGE, margin_mib=0)
    assert led.reservation("e2") is None


def test_port_outside_range_is_a_validation_error(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis)
    with pytest.raises(ValidationError, match="port: 9000 is outside host a's range 8100-8109"):
        led.reserve("e1", "a", [], port=9000, port_range=RANGE, margin_mib=0)
    assert led.is_empty()


def test_negative_memory_is_a_validation_error(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis)
    with pytest.raises(ValidationError, match="required_memory_gb"):
        led.reserve("e1", "a", [("GPU-a0", -5)], port_range=RANGE, margin_mib=0)
    assert led.is_empty()


def test_unknown_gpu_is_refused(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis)
    with pytest.raises(ReservationConflict, match="GPU GPU-zz is not in its inventory"):
        led.reserve("e1", "a", [("GPU-zz", GB)], port_range=RANGE, margin_mib=0)
    assert led.is_empty()


def test_range_exhausted_names_the_range(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis)
    for i in range(10):
        led.reserve(f"e{i}", "a", [], port_range=RANGE, margin_mib=0)
    with pytest.raises(ReservationConflict, match="no free port in 8100-8109"):
        led.reserve("e10", "a", [], port_range=RANGE, margin_mib=0)


def test_publish_capacity_keeps_reservations(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis)
    led.reserve("e1", "a", [("GPU-a0", 10 * GB)], port_range=RANGE, margin_mib=0)
    led.publish_capacity(
        "a", [GpuCapacity("a", i, f"GPU-a{i}", 80 * GB, 20 * GB) for i in range(2)]
    )
    gpu0 = led.capacity("a")[0]
    assert (gpu0.outside_mib, gpu0.reserved_mib) == (20 * GB, 10 * GB)
    assert gpu0.available_mib(GB) == 80 * GB - 20 * GB - 10 * GB - GB


def test_avoid_ports_are_never_picked_automatically(any_redis: redis.Redis) -> None:
    led = _ledger(any_redis)
    res = led.reserve("e1", "a", [], port_range=RANGE, margin_mib=0, avoid_ports={8100, 8101})
    assert res.port == 8102
