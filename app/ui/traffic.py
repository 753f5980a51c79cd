"""The gateway page's numbers: requests, errors and latency per model, over time.

They come from the counters ``GET /metrics`` exposes (``app.api.metrics``: requests by
model, engine and status; gateway failures by model and reason; the latency
histogram), read the way ``metrics.render`` reads them: every process's counters from
``PROMETHEUS_MULTIPROC_DIR`` when set (gunicorn, ``sagellm up``), else this process's.

A ring buffer of samples (``TrafficHistory``, one per process, a sample at most every
``SAMPLE_EVERY_S`` while a gateway page polls) turns the totals into rates: the table
shows the last minute, the chart the last minutes. A browser keeps its keep-alive
connection to one API process, so the page it polls sees one history.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from app.api.metrics import GATEWAY_ERRORS, GATEWAY_LATENCY, GATEWAY_REQUESTS

SAMPLE_EVERY_S = 5.0
HISTORY_SAMPLES = 72  # six minutes at one sample every 5 s
RATE_WINDOW_S = 60.0
NO_MODEL = ""  # the gateway counts some failures (unknown model) under no model


@dataclass
class ModelTotals:
    """Counters of one model since the processes started (monotonic)."""

    requests: float = 0.0
    errors: float = 0.0
    latency_sum: float = 0.0
    latency_count: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> count


@dataclass(frozen=True)
class Sample:
    at: float
    models: dict[str, ModelTotals]

    def total(self, attr: str) -> float:
        return sum(getattr(m, attr) for m in self.models.values())


@dataclass(frozen=True)
class ModelRates:
    model: str
    requests_per_s: float
    errors: int
    latency_avg_ms: float | None
    latency_p95_ms: float | None


def _families() -> Iterator[Metric]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        yield from registry.collect()
    else:
        for metric in (GATEWAY_REQUESTS, GATEWAY_ERRORS, GATEWAY_LATENCY):
            yield from metric.collect()


def read_sample(now: float | None = None) -> Sample:
    """The gateway counters now, per model."""
    models: dict[str, ModelTotals] = {}

    def of(name: str) -> ModelTotals:
        return models.setdefault(name, ModelTotals())

    for family in _families():
        if not family.name.startswith("sagellm_gateway_"):
            continue
        for s in family.samples:
            model = s.labels.get("model", NO_MODEL)
            if s.name == "sagellm_gateway_requests_total":
                of(model).requests += s.value
                if s.labels.get("code", "").startswith("5"):
                    of(model).errors += s.value
            elif s.name == "sagellm_gateway_errors_total":
                of(model).errors += s.value
            elif s.name == "sagellm_gateway_request_duration_seconds_sum":
                of(model).latency_sum += s.value
            elif s.name == "sagellm_gateway_request_duration_seconds_count":
                of(model).latency_count += s.value
            elif s.name == "sagellm_gateway_request_duration_seconds_bucket":
                bound = float(s.labels["le"])
                buckets = of(model).buckets
                buckets[bound] = buckets.get(bound, 0.0) + s.value
    return Sample(time.time() if now is None else now, models)


class TrafficHistory:
    """The last samples of this process (a ring buffer)."""

    def __init__(self, size: int = HISTORY_SAMPLES, every_s: float = SAMPLE_EVERY_S) -> None:
        self._samples: deque[Sample] = deque(maxlen=size)
        self._every_s = every_s
        self._lock = threading.Lock()

    def sample(self, now: float | None = None) -> list[Sample]:
        """Take a sample unless the last is younger than the interval; all samples."""
        now = time.time() if now is None else now
        with self._lock:
            due = not self._samples or now - self._samples[-1].at >= self._every_s * 0.9
        if due:
            taken = read_sample(now)
            with self._lock:
                self._samples.append(taken)
        with self._lock:
            return list(self._samples)


HISTORY = TrafficHistory()


def _quantile(q: float, low: Mapping[float, float], high: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over the increase between two samples."""
    bounds = sorted(high)
    counts = [high[b] - low.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            inside = count - prev_count
            share = (rank - prev_count) / inside if inside else 1.0
            return prev_bound + (bound - prev_bound) * share
        prev_bound, prev_count = bound, count
    return prev_bound


def model_rates(samples: list[Sample], window_s: float = RATE_WINDOW_S) -> list[ModelRates]:
    """Per model over the last ``window_s`` (or as much as was sampled)."""
    if not samples:
        return []
    last = samples[-1]
    first = next((s for s in samples if last.at - s.at <= window_s), last)
    span = last.at - first.at
    out = []
    for name, now in sorted(last.models.items()):
        before = first.models.get(name, ModelTotals())
        done = now.latency_count - before.latency_count
        took = now.latency_sum - before.latency_sum
        p95 = _quantile(0.95, before.buckets, now.buckets)
        out.append(
            ModelRates(
                model=name,
                requests_per_s=(now.requests - before.requests) / span if span > 0 else 0.0,
                errors=round(now.errors - before.errors),
                latency_avg_ms=took / done * 1000 if done else None,
                latency_p95_ms=p95 * 1000 if p95 is not None else None,
            )
        )
    return out


@dataclass(frozen=True)
class Chart:
    """An inline SVG line chart's geometry: requests/s and errors/s between samples."""

    width: int
    height: int
    requests: str  # polyline points
    errors: str
    peak: float  # requests/s at the top of the chart
    span_s: float
    points: int


def chart(samples: Iterable[Sample], width: int = 600, height: int = 120) -> Chart:
    """Rates between consecutive samples, scaled to ``width`` x ``height``: a step line
    (each rate held over the interval it was measured in)."""
    samples = list(samples)
    steps: list[tuple[float, float, float, float]] = []  # start, end, requests/s, errors/s
    for a, b in itertools.pairwise(samples):
        dt = b.at - a.at
        if dt > 0:
            requests = max(0.0, (b.total("requests") - a.total("requests")) / dt)
            errors = max(0.0, (b.total("errors") - a.total("errors")) / dt)
            steps.append((a.at, b.at, requests, errors))
    if not steps:
        return Chart(width, height, "", "", 0.0, 0.0, 0)
    t0 = samples[0].at
    span = max(samples[-1].at - t0, 1e-9)
    peak = max(*(s[2] for s in steps), *(s[3] for s in steps), 1.0)

    def points(column: int) -> str:
        def xy(at: float, value: float) -> str:
            return f"{(at - t0) / span * width:.1f},{height - 2 - value / peak * (height - 4):.1f}"

        return " ".join(f"{xy(s[0], s[column])} {xy(s[1], s[column])}" for s in steps)

    return Chart(width, height, points(2), points(3), peak, span, len(steps))
