"""Celery task durations and failures, summed in Redis by every worker (for /metrics)."""

from __future__ import annotations

from collections import defaultdict

import redis

from app.state import keys
from app.state.client import as_text


def record_task(client: redis.Redis, task: str, seconds: float, failed: bool) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(keys.TASK_STATS, f"{task}|count", 1)
    pipe.hincrbyfloat(keys.TASK_STATS, f"{task}|seconds", seconds)
    if failed:
        pipe.hincrby(keys.TASK_STATS, f"{task}|failures", 1)
    pipe.execute()


def task_stats(client: redis.Redis) -> dict[str, dict[str, float]]:
    """{task: {"count", "seconds", "failures"}}."""
    out: dict[str, dict[str, float]] = defaultdict(
        lambda: {"count": 0.0, "seconds": 0.0, "failures": 0.0}
    )
    raw: dict[bytes, bytes] = client.hgetall(keys.TASK_STATS)  # type: ignore[assignment]
    for field, value in raw.items():
        task, _, what = as_text(field).rpartition("|")
        out[task][what] = float(value)
    return dict(out)
