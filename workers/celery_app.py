"""The workers' Celery app: a factory, built from the settings when a worker or beat
starts (nothing is built at import).

Queues: each host's worker consumes ``host.<name>`` (work that must happen on that
host) and ``control`` (cluster-wide work: beat's fan-outs, pruning). The broker, ack
and visibility settings are ``app.state.queues.celery_config``, shared with the API's
sending app; this adds the tasks, beat's schedule, and the check that no task can
outlive the broker's visibility timeout.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from celery import Celery

from app.core.errors import ConfigError
from app.settings import Settings
from app.state.queues import APP_NAME, CONTROL_QUEUE, VISIBILITY_TIMEOUT_S, celery_config

TASK_MODULES = ["workers.tasks", "workers.agent.boot"]


def check_task_bounds(settings: Settings) -> None:
    """Refuse settings under which a task could outlive the visibility timeout (it would
    be delivered again while still running; see ``app.state.queues``)."""
    longest = settings.stop_grace_s + 3 * settings.health_timeout_s + 60
    if longest >= VISIBILITY_TIMEOUT_S:
        raise ConfigError(
            f"SAGELLM_STOP_GRACE_S={settings.stop_grace_s:g}: a stop could outlive the "
            f"broker visibility timeout ({VISIBILITY_TIMEOUT_S}s); use a shorter grace",
            field="SAGELLM_STOP_GRACE_S",
        )


def make_celery(settings: Settings) -> Celery:
    """A Celery app for workers and beat, configured from ``settings``; its tasks are in
    ``workers.tasks`` (registered by name when the app is finalised)."""
    check_task_bounds(settings)
    app = Celery(APP_NAME, include=TASK_MODULES)
    beat_every = {
        "health": settings.health_interval_s,
        "rediscovery": settings.rediscovery_interval_s,
        "prune": max(60.0, min(settings.prune_after_s, 3600.0)),
    }

    def every(task: str, what: str) -> dict[str, object]:
        return {
            "task": task,
            "schedule": beat_every[what],
            "options": {"queue": CONTROL_QUEUE, "expires": beat_every[what]},
        }

    app.conf.update(
        celery_config(settings.redis_url),
        beat_max_loop_interval=max(1.0, min(beat_every.values()) / 2),
        beat_schedule={
            "health-fanout": every("sagellm.tick_health", "health"),
            "rediscovery-fanout": every("sagellm.tick_rediscovery", "rediscovery"),
            "prune": every("sagellm.prune", "prune"),
            # external engines (registered endpoints): any one worker probes them all
            "external-probe": every("sagellm.probe_external", "health"),
        },
    )
    return app


@dataclass(frozen=True)
class _Process:
    settings: Settings
    app: Celery


_process: _Process | None = None
_guard = threading.Lock()


def worker_app(settings: Settings | None = None) -> Celery:
    """This worker or beat process's one Celery app: built on the first call, from
    ``settings`` (default: the environment); later calls return the same app."""
    return _this_process(settings).app


def process_settings() -> Settings:
    """The settings this process's app was built from (see ``worker_app``)."""
    return _this_process(None).settings


def _this_process(settings: Settings | None) -> _Process:
    global _process
    with _guard:
        if _process is None:
            settings = settings or Settings.from_env()
            _process = _Process(settings, make_celery(settings))
        return _process


def __getattr__(name: str) -> Celery:
    # `celery -A workers.celery_app <command>` looks up `app`: built on that first use.
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
