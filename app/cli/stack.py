"""The processes of a sagellm cluster: ``worker``, ``beat``, ``flower``, and ``up`` /
``down`` for the whole stack on one machine. These start workers, so (with ``app.dev``)
they are the only part of ``app`` that imports ``workers``."""

from __future__ import annotations

import os
import signal
from collections.abc import MutableMapping

import click

from app.settings import Settings


def _settings() -> Settings:
    from app.core.errors import ConfigError

    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None


@click.command()
@click.option("--loglevel", default="info", show_default=True)
def worker(loglevel: str) -> None:
    """Run this host's worker: queues host.<SAGELLM_HOST_NAME> and control."""
    settings = _settings()
    from app.state.queues import CONTROL_QUEUE, host_queue_name
    from workers.celery_app import worker_app

    argv = [
        "worker",
        "--queues",
        f"{host_queue_name(settings.host_name)},{CONTROL_QUEUE}",
        "--hostname",
        f"sagellm@{settings.host_name}",
        # Threads, not prefork: the worker's main process is the parent of the
        # engines it spawns (so it can reap them) and shares the heartbeat's state.
        "--pool",
        "threads",
        "--concurrency",
        str(settings.worker_concurrency),
        "--loglevel",
        loglevel,
        "--without-mingle",
        "--without-gossip",
    ]
    worker_app(settings).worker_main(argv)


@click.command()
@click.option("--loglevel", default="info", show_default=True)
def beat(loglevel: str) -> None:
    """Run the cluster's beat (exactly one): health checks, rediscovery, pruning."""
    settings = _settings()
    from app.state.client import connect
    from app.state.locks import BEAT_LOCK_TTL_S, BeatLock
    from workers.beat_scheduler import hold
    from workers.celery_app import worker_app

    def stop_now(reason: str) -> None:
        # From the renewing thread: Celery's SIGTERM handler ends the beat loop at
        # once, even mid-sleep; the check below then exits non-zero.
        os.kill(os.getpid(), signal.SIGTERM)

    lock = BeatLock(connect(settings.redis_url), on_lost=stop_now)
    if not lock.acquire():
        raise click.ClickException(
            "another beat is running for this Redis (only one may run); "
            f"if it died, wait {BEAT_LOCK_TTL_S:g}s for its lock to expire"
        )
    hold(lock)
    lock.start_renewing()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        worker_app(settings).start(
            [
                "beat",
                "--loglevel",
                loglevel,
                "--scheduler",
                "workers.beat_scheduler:SagellmScheduler",
                "--schedule",
                str(settings.data_dir / "celerybeat-schedule"),
            ]
        )
    except SystemExit:
        if not lock.lost.is_set():
            raise
    finally:
        # A clean exit frees the lock at once, so a restarted beat need not wait;
        # a lost lock is left alone (it is another beat's, or nobody's).
        lock.release()
    if lock.lost.is_set():
        raise click.ClickException(lock.reason)


FLOWER_OPEN_API_VAR = "FLOWER_UNAUTHENTICATED_API"


def flower_argv(
    port: int, address: str, basic_auth: str, env: MutableMapping[str, str]
) -> list[str]:
    """Flower's command line; refuses (``ClickException``) a non-loopback address
    without basic auth. Flower's API can queue any task (start or stop an engine) and
    shut workers down, so it is never opened without auth: ``FLOWER_UNAUTHENTICATED_API``
    is removed from ``env``. On loopback without auth the UI shows tasks and the API
    answers 401."""
    from app.api.auth import is_loopback

    if not basic_auth and not is_loopback(address):
        raise click.ClickException(
            f"Flower on {address} would let anyone who reaches it queue tasks (start and "
            "stop engines) and shut workers down: set SAGELLM_FLOWER_BASIC_AUTH=user:password, "
            "or bind it to loopback (--address 127.0.0.1)"
        )
    env.pop(FLOWER_OPEN_API_VAR, None)
    argv = ["flower", f"--port={port}", f"--address={address}"]
    if basic_auth:
        argv.append(f"--basic-auth={basic_auth}")
    return argv


@click.command()
@click.option("--port", default=5555, show_default=True, type=int)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Another address needs SAGELLM_FLOWER_BASIC_AUTH.",
)
def flower(port: int, address: str) -> None:
    """Flower (Celery task monitor) on the project's Celery app: every host's worker."""
    settings = _settings()
    argv = flower_argv(port, address, settings.flower_basic_auth, os.environ)
    from workers.celery_app import worker_app

    worker_app(settings).start(argv)


@click.command()
@click.option(
    "--keep-engines",
    is_flag=True,
    help="On exit leave engines running (a later `up` re-adopts them).",
)
def up(keep_engines: bool) -> None:
    """The whole stack on this machine: Redis, worker, beat, and the API at
    SAGELLM_API_URL (default http://127.0.0.1:8000)."""
    _settings()
    from app.dev.stack import run_up

    try:
        errors = run_up(keep_engines=keep_engines)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    if errors:
        raise click.ClickException("stopped with errors:\n  " + "\n  ".join(errors))


@click.command()
def down() -> None:
    """Stop the stack started by `up` (its engines first)."""
    _settings()
    from app.dev.stack import StackNotStopped, run_down

    try:
        stopped = run_down()
    except StackNotStopped as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("sagellm stack stopped" if stopped else "no sagellm stack is running")
