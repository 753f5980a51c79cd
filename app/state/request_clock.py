"""When each engine last got a gateway request: what idle stops and eviction read.

Each gateway process notes the time of every request it routes (``RequestClock.touch``:
a dict write, no I/O on the hot path) and publishes, every ``PUBLISH_EVERY_S``, how
many seconds ago each engine last got one (``{engine_id: seconds}``, a key with a TTL).
Ages rather than times: a host's worker that reads them adds them to its own clock, so
clocks that disagree across machines do not move an idle stop. Readers take the
smallest age over every process (``RequestAges.ages``).

On-demand counters (cold starts, idle stops, evictions, cold-start seconds) live here
too: one Redis hash, written by whoever sees the event, read by ``/metrics``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable

import redis

from app.state import keys
from app.state.client import as_text

PUBLISH_EVERY_S = 0.5
PUBLISH_TTL_S = 5
# The cold-start histogram's upper bounds, in seconds (Prometheus ``le``).
COLD_START_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class RequestClock:
    """This process's last request time per engine (monotonic clock)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self.process_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._publisher: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    def touch(self, engine_id: str) -> None:
        self._last[engine_id] = time.monotonic()
        if self._publisher is None and self._client is not None:
            self._start()

    def ages(self) -> dict[str, float]:
        now = time.monotonic()
        return {e: round(now - t, 3) for e, t in list(self._last.items())}

    def start_publishing(self, client: redis.Redis) -> None:
        """Publish ``ages`` every ``PUBLISH_EVERY_S`` (a daemon thread) from this
        process's first request on."""
        self._client = client

    def _start(self) -> None:
        with self._lock:
            if self._publisher is not None or self._client is None:
                return
            client = self._client
            key = keys.gateway_last_request(self.process_id)
            tick = threading.Event()

            def loop() -> None:
                while not tick.wait(PUBLISH_EVERY_S):
                    ages = self.ages()
                    if ages:
                        with contextlib.suppress(redis.RedisError):
                            client.set(key, json.dumps(ages), ex=PUBLISH_TTL_S)

            self._publisher = threading.Thread(target=loop, daemon=True, name="request-clock")
            self._publisher.start()


class RequestAges:
    """Every gateway process's published ages, in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    def ages(self, engine_ids: Iterable[str] | None = None) -> dict[str, float]:
        """Seconds since each engine's last gateway request (the youngest over every
        process); engines no process has routed to are absent."""
        wanted = None if engine_ids is None else set(engine_ids)
        names = list(self._r.scan_iter(match=keys.gateway_last_request("*"), count=200))
        out: dict[str, float] = {}
        for raw in self._r.mget(names) if names else []:
            if not raw:
                continue
            for engine_id, age in json.loads(raw).items():
                if wanted is not None and engine_id not in wanted:
                    continue
                if engine_id not in out or age < out[engine_id]:
                    out[engine_id] = float(age)
        return out


class OnDemandCounters:
    """Cluster-wide counters of the on-demand lifecycle (one Redis hash)."""

    COLD_STARTS = "cold_starts"
    IDLE_STOPS = "idle_stops"
    EVICTIONS = "evictions"

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    def add(self, name: str, amount: int = 1) -> None:
        with contextlib.suppress(redis.RedisError):
            self._r.hincrby(keys.ON_DEMAND_COUNTERS, name, amount)

    def observe_cold_start(self, seconds: float) -> None:
        pipe = self._r.pipeline(transaction=False)
        for bound in COLD_START_BUCKETS:
            if seconds <= bound:
                pipe.hincrby(keys.ON_DEMAND_COUNTERS, f"cold_start_le_{bound:g}", 1)
        pipe.hincrbyfloat(keys.ON_DEMAND_COUNTERS, "cold_start_sum", seconds)
        pipe.hincrby(keys.ON_DEMAND_COUNTERS, "cold_start_count", 1)
        with contextlib.suppress(redis.RedisError):
            pipe.execute()

    def read(self) -> dict[str, float]:
        raw = self._r.hgetall(keys.ON_DEMAND_COUNTERS)
        return {as_text(k): float(v) for k, v in raw.items()}
