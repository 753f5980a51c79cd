"""Requests in flight per engine: counted per process (``InFlight``: for balancing, no
I/O on the hot path) and published to Redis every ``PUBLISH_EVERY_S`` (``InFlightBoard``)
so the management API can show the cluster-wide sum (``GET /v1/management/backends``)
and a host's worker can tell when a DRAINING engine has nothing left in flight.

Each process publishes ``{"at", "fresh", "counts"}``: ``fresh`` is the write number
(``app.state.write_seq``) up to which the process's routing knows every engine's state
(``BackendDirectory.fresh_seq``): a process whose ``fresh`` is at or past the number of
the write that made an engine DRAINING sends the engine nothing new, so its count for
the engine can only fall (``InFlightBoard.drain_view``). Numbers, not times: Redis
hands them out, so the gateway's and the API's clocks never meet in the comparison."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from app.state import keys

if TYPE_CHECKING:
    from app.state.registry import Registry

# A drain ends at most this much after its last request (one small SET per gateway
# process per tick); the counts expire PUBLISH_TTL_S after their process stopped.
PUBLISH_EVERY_S = 0.1
PUBLISH_TTL_S = 3


class InFlight:
    """This process's counts. ``fresh``: the write number up to which its routing knows
    every engine's state (None, or a function that answers None: it cannot tell, and a
    drain counts it as not knowing)."""

    def __init__(self, fresh: Callable[[], int | None] | None = None) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.process_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._publisher: threading.Thread | None = None
        self._board: InFlightBoard | None = None
        self._fresh = fresh or (lambda: None)

    def inc(self, engine_id: str) -> None:
        with self._lock:
            self._counts[engine_id] += 1
        if self._publisher is None and self._board is not None:
            self._start()

    def dec(self, engine_id: str) -> None:
        with self._lock:
            self._counts[engine_id] -= 1
            if self._counts[engine_id] <= 0:
                del self._counts[engine_id]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def report(self) -> dict[str, Any]:
        """What is published: ``fresh`` is read before the counts, so every request
        routed with older knowledge is in them."""
        fresh = self._fresh()
        return {"at": time.time(), "fresh": fresh, "counts": self.snapshot()}

    def start_publishing(self, board: InFlightBoard) -> None:
        """Publish this process's counts to ``board`` every ``PUBLISH_EVERY_S`` (a daemon
        thread), from this process's first proxied request on: a process that never
        sent an engine a request has nothing to report (a drain needs no word from it:
        whatever it routes later, it routes with a view read after the drain began),
        and an idle process, or each app a test builds, costs Redis nothing."""
        self._board = board

    def _start(self) -> None:
        with self._lock:
            if self._publisher is not None or self._board is None:
                return
            board = self._board
            tick = threading.Event()  # never set: a sleep that cannot be interrupted early

            def loop() -> None:
                while not tick.wait(PUBLISH_EVERY_S):
                    with contextlib.suppress(redis.RedisError):
                        board.publish(self.process_id, self.report())

            self._publisher = threading.Thread(target=loop, daemon=True, name="inflight-publisher")
            self._publisher.start()


class InFlightBoard:
    """Every gateway process's published counts, in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    @classmethod
    def of(cls, registry: Registry) -> InFlightBoard:
        """On the Redis that ``registry`` uses."""
        return cls(registry.r)

    def publish(self, process_id: str, report: dict[str, Any]) -> None:
        """One gateway process's ``InFlight.report`` (or bare counts); it expires unless
        published again."""
        self._r.set(keys.gateway_in_flight(process_id), json.dumps(report), ex=PUBLISH_TTL_S)

    def _reports(self, skip: str | None = None) -> list[dict[str, Any]]:
        keys_seen = [
            k
            # one SCAN step covers a thousand keys (of every kind, a few per engine)
            for k in self._r.scan_iter(match=keys.gateway_in_flight("*"), count=1000)
            if skip is None or k.decode() != skip
        ]
        out = []
        for raw in self._r.mget(keys_seen) if keys_seen else []:
            if not raw:
                continue
            report = json.loads(raw)
            if "counts" not in report:  # bare counts (an older publisher)
                report = {"at": 0.0, "fresh": 0.0, "counts": report}
            out.append(report)
        return out

    def drain_view(self, engine_id: str, since: int) -> tuple[int, int]:
        """For an engine made DRAINING by write number ``since``: (requests in flight
        to it, gateway processes that may not know of the drain yet: their ``fresh`` is
        older, or not a write number). The drain is over when both are 0."""
        in_flight = behind = 0
        for report in self._reports():
            in_flight += int(report["counts"].get(engine_id, 0))
            fresh = report.get("fresh")
            if not isinstance(fresh, int) or fresh < since:
                behind += 1
        return in_flight, behind

    def busy(self) -> set[str]:
        """Engines with a request in flight through any gateway process."""
        return {engine for engine, n in self.total().items() if n > 0}

    def total(self, local: InFlight | None = None) -> dict[str, int]:
        """``local``'s live counts plus every other gateway process's published ones."""
        total: Counter[str] = Counter(local.snapshot() if local else {})
        own = keys.gateway_in_flight(local.process_id) if local else None
        for report in self._reports(skip=own):
            total.update(report["counts"])
        return dict(total)
