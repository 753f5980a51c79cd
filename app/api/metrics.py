"""Prometheus metrics: ``GET /metrics`` on the API.

* Cluster state (engines, GPUs, hosts, restarts, failures by reason, task stats) is
  read from Redis at scrape time by ``ClusterCollector``, so every API process reports
  the same truth.
* Gateway traffic (requests, errors, latency) is counted in the process serving it.
  Under gunicorn, set ``PROMETHEUS_MULTIPROC_DIR`` (``up`` and docker-compose do) and
  the scrape sums every process.
"""

from __future__ import annotations

import os
import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

MIB = 1024 * 1024

GATEWAY_REQUESTS = Counter(
    "sagellm_gateway_requests_total",
    "Gateway requests answered by an engine, by model, engine and HTTP status",
    ["model", "engine", "code"],
    registry=None,
)
GATEWAY_ERRORS = Counter(
    "sagellm_gateway_errors_total",
    "Gateway failures by model and reason (unknown_model, no_backend, bad_request, "
    "upstream_connect, upstream_5xx, all_failed, stream_broken)",
    ["model", "reason"],
    registry=None,
)
GATEWAY_LATENCY = Histogram(
    "sagellm_gateway_request_duration_seconds",
    "Time from request to the end of the response (streams: to the last byte)",
    ["model", "engine"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=None,
)
_GATEWAY = (GATEWAY_REQUESTS, GATEWAY_ERRORS, GATEWAY_LATENCY)


class ClusterCollector(Collector):
    """Engines, GPUs, hosts, restarts and task stats, from the registry and ledger."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        from app.core import status

        c = self.cluster
        hosts = c.registry.hosts()
        engines = c.registry.engines()

        by_state: Tally[tuple[str, str, str]] = Tally(
            (e.state.value, e.spec.kind.value, e.host or "") for e in engines
        )
        g = GaugeMetricFamily(
            "sagellm_engines", "Engines by state, kind and host", labels=["state", "kind", "host"]
        )
        for (state, kind, host), n in sorted(by_state.items()):
            g.add_metric([state, kind, host], n)
        yield g

        restarts = CounterMetricFamily(
            "sagellm_engine_restarts",
            "Automatic restarts of each engine",
            labels=["engine", "model", "host"],
        )
        for e in engines:
            restarts.add_metric([e.id, e.spec.name, e.host or ""], e.restart_count)
        yield restarts

        # Each engine's record counts its deaths by reason (``failure_counts``, written
        # by its worker in the same write as the death): summed here, every API process
        # reports the same. An engine's share leaves with its record when it is pruned,
        # which Prometheus reads as a counter reset (rate() and increase() handle it).
        by_reason: Tally[str] = Tally()
        for e in engines:
            by_reason.update(e.failure_counts)
        failures = CounterMetricFamily(
            "sagellm_engine_failures",
            "Engine processes that ended (crash or failed start), by the reason read from "
            "their exit status and log (app.core.failures.Reason)",
            labels=["reason"],
        )
        for reason, n in sorted(by_reason.items()):
            failures.add_metric([reason], n)
        yield failures

        up = GaugeMetricFamily(
            "sagellm_host_up", "1 when the host's heartbeat is fresh", labels=["host"]
        )
        age = GaugeMetricFamily(
            "sagellm_host_heartbeat_age_seconds",
            "Seconds since the host's last heartbeat",
            labels=["host"],
        )
        for h in hosts:
            up.add_metric([h.name], 1 if h.up else 0)
            age.add_metric([h.name], round(h.heartbeat_age_s, 3))
        yield up
        yield age

        rows = status.gpu_rows(
            hosts,
            {h.name: c.ledger.capacity(h.name) for h in hosts},
            c.settings.gpu_safety_margin_mib,
        )
        families = {
            name: GaugeMetricFamily(
                f"sagellm_gpu_memory_{name}_bytes", doc, labels=["host", "gpu", "uuid"]
            )
            for name, doc in (
                ("total", "GPU memory in total"),
                ("outside", "GPU memory held by processes that are not sagellm engines"),
                ("reserved", "GPU memory reserved by sagellm engines"),
                ("available", "GPU memory free for new reservations (after the margin)"),
            )
        }
        for row in rows:
            labels = [row["host"], str(row["index"]), row["uuid"]]
            for name, fam in families.items():
                fam.add_metric(labels, row[f"{name}_mib"] * MIB)
        yield from families.values()

        stats = c.task_stats.read()
        count = CounterMetricFamily("sagellm_task_runs", "Celery tasks run", labels=["task"])
        secs = CounterMetricFamily(
            "sagellm_task_duration_seconds",
            "Total seconds spent in each Celery task",
            labels=["task"],
        )
        fails = CounterMetricFamily(
            "sagellm_task_failures", "Celery tasks that raised", labels=["task"]
        )
        for task, s in sorted(stats.items()):
            count.add_metric([task], s["count"])
            secs.add_metric([task], s["seconds"])
            fails.add_metric([task], s["failures"])
        yield count
        yield secs
        yield fails
        yield from _on_demand(c)


def _on_demand(c: Any) -> Iterator[Any]:
    """Cold starts, idle stops, evictions and the cold-start duration histogram."""
    from prometheus_client.core import HistogramMetricFamily

    from app.core.models import EngineState
    from app.state.on_demand_counters import COLD_START_BUCKETS, OnDemandCounters

    counts = OnDemandCounters(c.registry.r).read()
    for name, doc in (
        ("cold_starts", "Engines started by a gateway request for a STANDBY model"),
        ("idle_stops", "Engines stopped after their idle timeout"),
        ("evictions", "Idle on-demand engines drained back to STANDBY to make room"),
    ):
        fam = CounterMetricFamily(f"sagellm_{name}", doc)
        fam.add_metric([], counts.get(name, 0.0))
        yield fam
    buckets = [(f"{b:g}", counts.get(f"cold_start_le_{b:g}", 0.0)) for b in COLD_START_BUCKETS]
    buckets.append(("+Inf", counts.get("cold_start_count", 0.0)))
    hist = HistogramMetricFamily(
        "sagellm_cold_start_seconds", "Seconds from a cold start's wake to RUNNING"
    )
    hist.add_metric([], buckets, sum_value=counts.get("cold_start_sum", 0.0))
    yield hist
    countdown = GaugeMetricFamily(
        "sagellm_engine_idle_stop_seconds",
        "Seconds until a RUNNING engine with an idle timeout is stopped for idleness",
        labels=["engine", "model"],
    )
    now = time.time()
    for rec in c.registry.engines(state=EngineState.RUNNING):
        if rec.idle_stops_at is not None:
            countdown.add_metric([rec.id, rec.spec.name], max(0.0, rec.idle_stops_at - now))
    yield countdown


def render(cluster: Any) -> bytes:
    """The text exposition of every metric."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        for metric in _GATEWAY:
            registry.register(metric)
    registry.register(ClusterCollector(cluster))
    return generate_latest(registry)
