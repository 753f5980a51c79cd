"""Everything a host worker's operations need, built once per worker process."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from celery import Celery

from app.core.health import HealthPolicy
from app.core.models import EngineRecord
from app.settings import Settings
from app.state.client import connect
from app.state.ledger import Ledger
from app.state.registry import Registry
from app.state.task_stats import TaskStats
from workers.host.manifests import Manifests


class Watch(Protocol):
    """What the worker's engine watch (``workers.agent.watch.EngineWatch``) offers."""

    def track(self, rec: EngineRecord | None) -> None: ...

    def sync(self) -> None: ...


# How a drain watch runs (``workers.agent.drain``): given the watch and a thread name.
DrainRunner = Callable[[Callable[[], None], str], None]


@dataclass
class HostContext:
    settings: Settings
    registry: Registry
    ledger: Ledger
    manifests: Manifests
    http: httpx.Client
    celery: Celery
    policy: HealthPolicy
    task_stats: TaskStats
    # One operation at a time per engine in this worker (start task, health loop, stop
    # task and rediscovery run on different threads); reentrant for nested calls.
    _engine_locks: dict[str, threading.RLock] = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)
    # Held while rediscovery re-takes reservations and while capacity is published, so
    # this host never offers capacity before its running engines hold their room.
    reclaim_lock: threading.RLock = field(default_factory=threading.RLock)
    # The event-driven watch of readiness and exits (``workers.agent.watch``), started
    # by the worker at boot; None where contexts are driven step by step (tests), and
    # then readiness is polled by the ``sagellm.watch_start`` task instead.
    watch: Watch | None = None
    # Drains this worker watches (``workers.agent.drain``), and how a watch runs: None,
    # a daemon thread each; where tests drive a host step by step, inline.
    drain_watching: set[str] = field(default_factory=set)
    drain_runner: DrainRunner | None = None
    # Its worker is gone (tests that replace it in-process): its drain watches end
    # without acting, as they would have with it.
    abandoned: bool = False
    # This host's model facts publisher (``workers.agent.heartbeat``), made on first use.
    model_facts: Any = None

    @contextmanager
    def engine_lock(self, engine_id: str, *, blocking: bool = True) -> Iterator[bool]:
        """Serialise operations on one engine in this worker. Yields False (and holds
        nothing) when ``blocking`` is False and another thread is acting on it."""
        with self._locks_guard:
            lock = self._engine_locks.setdefault(engine_id, threading.RLock())
        if not lock.acquire(blocking=blocking):
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def track(self, rec: EngineRecord | None) -> bool:
        """Hand ``rec`` to the engine watch; False when this context has none."""
        if self.watch is None:
            return False
        self.watch.track(rec)
        return True

    @property
    def host(self) -> str:
        return self.settings.host_name

    @property
    def host_dir(self) -> Path:
        return self.settings.data_dir / "hosts" / self.settings.host_name

    def log_path(self, engine_id: str) -> Path:
        path = self.host_dir / "logs" / f"{engine_id}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def health_policy(settings: Settings) -> HealthPolicy:
    return HealthPolicy(
        unhealthy_after=settings.unhealthy_after,
        restart_after=settings.unhealthy_after * 2,
        max_restarts=settings.max_restarts,
        backoff_s=settings.restart_backoff_s,
        backoff_max_s=settings.restart_backoff_max_s,
    )


def build_context(settings: Settings, celery: Celery) -> HostContext:
    settings.engine_policy()  # a bad SAGELLM_ENGINE_UNSAFE_FLAGS stops start-up
    client = connect(settings.redis_url)
    host_dir = settings.data_dir / "hosts" / settings.host_name
    return HostContext(
        settings=settings,
        registry=Registry(client),
        ledger=Ledger(client),
        manifests=Manifests(host_dir / "engines"),
        # One pooled client per process; probes set their own short timeouts.
        http=httpx.Client(timeout=settings.health_timeout_s, trust_env=False),
        celery=celery,
        policy=health_policy(settings),
        task_stats=TaskStats(client),
    )


_ctx: HostContext | None = None
_lock = threading.Lock()


def host_context() -> HostContext:
    """The worker process's context (created on first use), on the process's Celery
    app and the settings it was built from (``workers.celery_app.worker_app``): one Redis
    client and one HTTP client per process."""
    global _ctx
    with _lock:
        if _ctx is None:
            from workers.celery_app import process_settings, worker_app

            _ctx = build_context(process_settings(), worker_app())
        return _ctx
