"""Cluster-wide counters of the on-demand lifecycle (cold starts, idle stops,
evictions, cold-start seconds): one Redis hash, incremented by whoever sees the event
(a gateway's wake, a host's idle check, an eviction's write, a worker's readiness
check), read by ``/metrics``."""

from __future__ import annotations

import contextlib

import redis

from app.state import keys
from app.state.client import as_text

# The cold-start histogram's upper bounds, in seconds (Prometheus ``le``).
COLD_START_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


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
