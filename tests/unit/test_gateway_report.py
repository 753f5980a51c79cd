"""One report per gateway process (``app.state.gateway_report``): what it holds, when
and how it is written, and what the drain, the idle check and ``busy`` read from every
live report, on a real redis-server."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import redis

from app.state import keys
from app.state.gateway_report import (
    REPORT_EVERY_S,
    REPORT_TTL_S,
    GatewayReport,
    GatewayReports,
    GatewayTraffic,
)


def _reporters() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "gateway-report")


def _wait_for_key(r: redis.Redis, key: str, timeout_s: float = 3.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        raw = r.get(key)
        if raw is not None:
            return raw  # type: ignore[no-any-return]
        time.sleep(0.02)
    raise AssertionError(f"{key} was never written")


def test_a_report_holds_in_flight_counts_the_write_number_heard_and_request_ages() -> None:
    traffic = GatewayTraffic(fresh=lambda: 41)
    traffic.inc("a")
    traffic.inc("a")
    traffic.inc("b")
    traffic.dec("b")  # finished: out of the counts, still in the ages
    report = traffic.report()
    assert report.fresh == 41
    assert report.in_flight == {"a": 2}
    assert set(report.ages) == {"a", "b"}
    assert all(0 <= age < 1 for age in report.ages.values())
    assert GatewayReport.decode(report.encode()) == report


def test_the_write_number_is_read_before_the_counts() -> None:
    """A request routed while ``fresh`` was being read (with knowledge at most that old)
    is in the counts of the same report: a drain never misses it."""

    def fresh() -> int:
        traffic.inc("a")  # routed meanwhile
        return 7

    traffic = GatewayTraffic(fresh=fresh)
    report = traffic.report()
    assert report.fresh == 7 and report.in_flight == {"a": 1}


def test_ages_are_seconds_since_the_last_request_not_clock_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    clock = SimpleNamespace(monotonic=lambda: now[0], time=lambda: 1e9)
    monkeypatch.setattr("app.state.gateway_report.time", clock)
    traffic = GatewayTraffic()
    traffic.inc("a")
    traffic.dec("a")
    now[0] += 42.0
    assert traffic.report().ages == {"a": 42.0}
    traffic.touch("a")  # a stream's end is activity too
    now[0] += 1.5
    assert traffic.report().ages == {"a": 1.5}


def test_a_process_reports_from_its_first_proxied_request_on_with_one_thread_and_one_key(
    real_redis: redis.Redis,
) -> None:
    traffic = GatewayTraffic(fresh=lambda: 3)
    traffic.start_reporting(GatewayReports(real_redis))
    key = keys.gateway_report(traffic.process_id)
    before = _reporters()
    try:
        time.sleep(3 * REPORT_EVERY_S)
        assert real_redis.get(key) is None  # no request yet: nothing written, no thread
        assert _reporters() == before
        # Apps other tests built in this process may still report (their own keys).
        others = set(real_redis.scan_iter(match=keys.gateway_report("*")))

        for _ in range(5):
            traffic.inc("a")
        report = GatewayReport.decode(_wait_for_key(real_redis, key))
        assert report.fresh == 3 and report.in_flight == {"a": 5} and set(report.ages) == {"a"}
        assert _reporters() == before + 1  # one thread, however many requests
        now_there = set(real_redis.scan_iter(match=keys.gateway_report("*")))
        assert now_there - others == {key.encode()}
        # it expires unless written again: a dead process's report goes away by itself
        assert 0 < real_redis.pttl(key) <= REPORT_TTL_S * 1000
        traffic.dec("a")
        deadline = time.monotonic() + 3
        while GatewayReport.decode(real_redis.get(key) or b"{}").in_flight != {"a": 4}:
            assert time.monotonic() < deadline, "the report was not written again"
            time.sleep(0.02)
    finally:
        traffic.stop_reporting()  # none of it in the next tests
    assert _reporters() == before
    real_redis.delete(key)
    time.sleep(2 * REPORT_EVERY_S)
    assert real_redis.get(key) is None


def test_a_report_expires_when_its_process_stops_writing(real_redis: redis.Redis) -> None:
    reports = GatewayReports(real_redis)
    reports.write("gone", GatewayReport(fresh=9, in_flight={"a": 1}, ages={"a": 0.1}))
    assert reports.busy() == {"a"}
    real_redis.pexpire(keys.gateway_report("gone"), 1)  # its TTL ran out
    time.sleep(0.05)
    assert reports.busy() == set()
    assert reports.drain_view("a", since=5) == (0, 0)


def test_drain_view_sums_every_process_and_counts_those_behind_the_drain(
    real_redis: redis.Redis,
) -> None:
    reports = GatewayReports(real_redis)
    reports.write("p1", GatewayReport(fresh=10, in_flight={"a": 2, "b": 1}))
    reports.write("p2", GatewayReport(fresh=12, in_flight={"a": 1}))
    reports.write("p3", GatewayReport(fresh=None))  # cannot tell: counted as behind
    assert reports.drain_view("a", since=10) == (3, 1)
    assert reports.drain_view("a", since=11) == (3, 2)  # p1 has not heard write 11
    assert reports.drain_view("c", since=1) == (0, 1)


def test_total_busy_and_idle_view_read_every_live_report(real_redis: redis.Redis) -> None:
    reports = GatewayReports(real_redis)
    reports.write("p1", GatewayReport(fresh=1, in_flight={"a": 2}, ages={"a": 0.5, "b": 30.0}))
    reports.write("p2", GatewayReport(fresh=1, in_flight={"b": 1}, ages={"a": 9.0, "b": 4.0}))
    assert reports.busy() == {"a", "b"}
    assert reports.total() == {"a": 2, "b": 1}
    ages, busy = reports.idle_view(["a", "b", "c"])
    assert ages == {"a": 0.5, "b": 4.0}  # the youngest over every process
    assert busy == {"a", "b"}
    assert reports.idle_view(["b"])[0] == {"b": 4.0}


def test_total_counts_this_process_live_and_not_its_own_report_twice(
    real_redis: redis.Redis,
) -> None:
    reports = GatewayReports(real_redis)
    local = GatewayTraffic()
    local.inc("a")
    reports.write(local.process_id, local.report())  # its last report: 1 in flight
    local.inc("a")  # and one more since
    reports.write("other", GatewayReport(fresh=1, in_flight={"a": 5}))
    assert reports.total(local) == {"a": 7}


def test_a_report_with_no_write_number_counts_as_behind(real_redis: redis.Redis) -> None:
    real_redis.set(keys.gateway_report("odd"), '{"fresh": "12", "in_flight": {"a": 1}}')
    assert GatewayReports(real_redis).drain_view("a", since=1) == (1, 1)


class _FailsOnce(GatewayReports):
    """A Redis whose first write fails with something other than a RedisError (a
    connection closed under the write)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.failed = False

    def write(self, process_id: str, report: GatewayReport) -> None:
        if not self.failed:
            self.failed = True
            raise ValueError("I/O operation on closed file.")
        super().write(process_id, report)


def test_the_reporter_outlives_a_failed_write(real_redis: redis.Redis) -> None:
    """A reporter that died would leave this process's requests in flight unseen by
    every drain once its last report expired."""
    traffic = GatewayTraffic(fresh=lambda: 1)
    reports = _FailsOnce(real_redis)
    traffic.start_reporting(reports)
    try:
        traffic.inc("a")
        raw = _wait_for_key(real_redis, keys.gateway_report(traffic.process_id))
        assert reports.failed and GatewayReport.decode(raw).in_flight == {"a": 1}
    finally:
        traffic.stop_reporting()
