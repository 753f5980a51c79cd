"""What each gateway process reports about its traffic: one Redis key per process.

A gateway process counts its own traffic in memory (``GatewayTraffic``: no I/O on the
hot path; its balancer reads the counts) and, from its first proxied request on, one
thread of it writes one report every ``REPORT_EVERY_S`` with one SET (a key with a
``REPORT_TTL_S`` TTL, ``keys.gateway_report``: a dead process's report expires). The
report (``GatewayReport``) holds:

* ``in_flight``: its requests in flight per engine;
* ``fresh``: the write number (``app.state.write_seq``) up to which its routing knows
  every engine's state (``BackendDirectory.fresh_seq``), read before the counts;
* ``ages``: how many seconds ago it last routed a request to each engine (the end of
  a stream counts too).

Readers take every live report (``GatewayReports``): the management API's cluster-wide
in-flight sum (``total``), eviction candidates (``busy``), a host's idle check
(``idle_view``) and a host's drain watch (``drain_view``). Nothing in a report is a
clock time, so the clocks of the gateway's machine and the reader's never meet: a
drain compares write numbers (a process whose ``fresh`` is at or past the number of the
write that made an engine DRAINING sends the engine nothing new, so its count can only
fall), and an idle check adds ages to its own clock.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from app.state import keys
from app.state.client import as_text

if TYPE_CHECKING:
    from app.state.registry import Registry

log = logging.getLogger(__name__)
# A drain ends at most this much after its last request (one small SET per gateway
# process per tick); a report expires REPORT_TTL_S after its process stopped.
REPORT_EVERY_S = 0.1
REPORT_TTL_S = 3


@dataclass(frozen=True)
class GatewayReport:
    """One gateway process's report. ``fresh`` None: the process cannot tell how
    current its routing is (no subscription), and a drain counts it as not knowing."""

    fresh: int | None = None
    in_flight: dict[str, int] = field(default_factory=dict)
    ages: dict[str, float] = field(default_factory=dict)

    def encode(self) -> str:
        return json.dumps({"fresh": self.fresh, "in_flight": self.in_flight, "ages": self.ages})

    @classmethod
    def decode(cls, raw: bytes | str) -> GatewayReport:
        data = json.loads(raw)
        fresh = data.get("fresh")
        return cls(
            fresh=fresh if isinstance(fresh, int) else None,
            in_flight={str(e): int(n) for e, n in (data.get("in_flight") or {}).items()},
            ages={str(e): float(a) for e, a in (data.get("ages") or {}).items()},
        )


class GatewayTraffic:
    """This process's traffic: requests in flight and the last request per engine.
    ``fresh``: the write number up to which its routing knows every engine's state
    (None, or a function that answers None: it cannot tell)."""

    def __init__(self, fresh: Callable[[], int | None] | None = None) -> None:
        self._counts: Counter[str] = Counter()
        self._last: dict[str, float] = {}  # engine id -> monotonic time of its last request
        self._lock = threading.Lock()
        self.process_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._reporter: threading.Thread | None = None
        self._reports: GatewayReports | None = None
        self._stop = threading.Event()
        self._fresh = fresh or (lambda: None)

    def inc(self, engine_id: str) -> None:
        """A request routed to ``engine_id``: in flight from now, and its last request."""
        with self._lock:
            self._counts[engine_id] += 1
            self._last[engine_id] = time.monotonic()
        if self._reporter is None and self._reports is not None:
            self._start()

    def dec(self, engine_id: str) -> None:
        with self._lock:
            self._counts[engine_id] -= 1
            if self._counts[engine_id] <= 0:
                del self._counts[engine_id]

    def touch(self, engine_id: str) -> None:
        """Activity of ``engine_id`` now (a request's answer, a stream's end)."""
        self._last[engine_id] = time.monotonic()

    def snapshot(self) -> dict[str, int]:
        """Requests in flight per engine through this process."""
        with self._lock:
            return dict(self._counts)

    def ages(self) -> dict[str, float]:
        """Seconds since each engine's last request through this process."""
        now = time.monotonic()
        return {e: round(now - t, 3) for e, t in list(self._last.items())}

    def report(self) -> GatewayReport:
        """What is written: ``fresh`` is read before the counts, so every request
        routed with older knowledge is in them."""
        fresh = self._fresh()
        return GatewayReport(fresh=fresh, in_flight=self.snapshot(), ages=self.ages())

    def start_reporting(self, reports: GatewayReports) -> None:
        """Write this process's report to ``reports`` every ``REPORT_EVERY_S`` (a daemon
        thread), from this process's first proxied request on: a process that never
        sent an engine a request has nothing to report (a drain needs no word from it:
        whatever it routes later, it routes with a view read after the drain began),
        and an idle process, or each app a test builds, costs Redis nothing."""
        self._reports = reports

    def stop_reporting(self) -> None:
        """Write no more reports (the last one expires); for tests: a process that
        exits needs nothing."""
        self._reports = None
        self._stop.set()
        if self._reporter is not None:
            self._reporter.join(REPORT_EVERY_S * 10)

    def _start(self) -> None:
        with self._lock:
            if self._reporter is not None or self._reports is None:
                return
            reports = self._reports

            def loop() -> None:
                # Never dies: without its reports, drains would not see this process's
                # requests in flight once its last report expired.
                while not self._stop.wait(REPORT_EVERY_S):
                    try:
                        reports.write(self.process_id, self.report())
                    except redis.RedisError:
                        pass  # Redis away for a moment: the next tick writes again
                    except Exception:
                        log.exception("gateway report of process %s failed", self.process_id)

            self._reporter = threading.Thread(target=loop, daemon=True, name="gateway-report")
            self._reporter.start()


class GatewayReports:
    """Every live gateway process's report, in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    @classmethod
    def of(cls, registry: Registry) -> GatewayReports:
        """On the Redis that ``registry`` uses."""
        return cls(registry.r)

    def write(self, process_id: str, report: GatewayReport) -> None:
        """One gateway process's report; it expires unless written again."""
        self._r.set(keys.gateway_report(process_id), report.encode(), ex=REPORT_TTL_S)

    def read(self, skip: str | None = None) -> list[GatewayReport]:
        """The live reports (but process ``skip``'s)."""
        skipped = keys.gateway_report(skip) if skip is not None else None
        names = [
            k
            # one SCAN step covers a thousand keys (of every kind, a few per engine)
            for k in self._r.scan_iter(match=keys.gateway_report("*"), count=1000)
            if as_text(k) != skipped
        ]
        return [GatewayReport.decode(raw) for raw in self._r.mget(names) if raw] if names else []

    def drain_view(self, engine_id: str, since: int) -> tuple[int, int]:
        """For an engine made DRAINING by write number ``since``: (requests in flight
        to it, gateway processes that may not know of the drain yet: their ``fresh`` is
        older, or unknown). The drain is over when both are 0."""
        in_flight = behind = 0
        for report in self.read():
            in_flight += report.in_flight.get(engine_id, 0)
            if report.fresh is None or report.fresh < since:
                behind += 1
        return in_flight, behind

    def busy(self) -> set[str]:
        """Engines with a request in flight through any gateway process."""
        return _busy(self.read())

    def total(self, local: GatewayTraffic | None = None) -> dict[str, int]:
        """``local``'s live counts plus every other gateway process's reported ones."""
        total: Counter[str] = Counter(local.snapshot() if local else {})
        for report in self.read(skip=local.process_id if local else None):
            total.update(report.in_flight)
        return dict(total)

    def idle_view(self, engine_ids: Iterable[str]) -> tuple[dict[str, float], set[str]]:
        """For an idle check of ``engine_ids``, from one read: seconds since each one's
        last gateway request (the youngest age over every process; one no process
        routed to is absent), and the engines with a request in flight now."""
        wanted = set(engine_ids)
        reports = self.read()
        ages: dict[str, float] = {}
        for report in reports:
            for engine_id, age in report.ages.items():
                if engine_id in wanted and (engine_id not in ages or age < ages[engine_id]):
                    ages[engine_id] = age
        return ages, _busy(reports)


def _busy(reports: Iterable[GatewayReport]) -> set[str]:
    return {e for report in reports for e, n in report.in_flight.items() if n > 0}
