"""Beat's scheduler, which also marks the engines of DOWN hosts LOST.

That marking cannot be a task: when the only worker dies, nobody consumes the
``control`` queue, yet its engines must become LOST. Beat is exactly one per cluster
and needs no worker, so it does this itself on every health interval.

"Exactly one" is held by ``BeatLock``: a Redis key with the running beat's token and
a TTL that a thread renews. A beat that finds the key gone or someone else's stops
at once (the scheduler refuses to tick, the process is signalled and exits non-zero):
another beat may already be running, and two beats would schedule everything twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.beat import PersistentScheduler
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from app.core.errors import SagellmError
from app.core.models import LIVE_STATES, EngineState
from app.state import keys
from app.state.client import connect
from app.state.registry import Registry

log = logging.getLogger(__name__)
S = EngineState

# A killed beat's successor waits at most this long; renewing every 2 s leaves seven
# tries before the key could expire, and a lost lock is noticed within 2 s.
BEAT_LOCK_TTL_S = 15.0
BEAT_LOCK_RENEW_S = 2.0


class BeatLock:
    """The one-beat-per-cluster lock: ``keys.BEAT_LOCK`` holding this beat's token.

    Built on redis-py's ``Lock``: acquire is ``SET NX PX`` and renew (``reacquire``)
    is a Lua compare-and-set that resets the TTL only while the key still holds our
    token, so a renew can never overwrite another beat's lock. A renew that finds
    another token, or no key at all, sets ``lost`` and never takes the key again:
    another beat may have started in between.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: float = BEAT_LOCK_TTL_S,
        renew_every_s: float = BEAT_LOCK_RENEW_S,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        # thread_local=False: the token is taken here and renewed by another thread.
        self._lock = Lock(client, keys.BEAT_LOCK, timeout=ttl_s, thread_local=False)
        self.ttl_s = ttl_s
        self.renew_every_s = renew_every_s
        self.lost = threading.Event()
        self.reason = ""
        self._on_lost = on_lost
        self._once = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed_at = 0.0  # monotonic time of the last renew that was sent and held

    @property
    def token(self) -> bytes | None:
        token: bytes | None = self._lock.local.token
        return token

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; never waits."""
        sent = time.monotonic()
        if not self._lock.acquire(blocking=False):
            return False
        self._renewed_at = sent
        return True

    def renew(self) -> bool:
        """Reset the TTL if the key still holds our token; False (and ``lost``) if not.

        A Redis error is retried on the next renew, unless a whole TTL has passed since
        the last good one: the key has expired by then, so the lock is lost as well.
        """
        if self.lost.is_set() or self.token is None:
            return False
        sent = time.monotonic()
        try:
            self._lock.reacquire()
        except LockNotOwnedError:
            return self._lose("the key holds another beat's token, or expired")
        except redis.RedisError as exc:
            if sent - self._renewed_at >= self.ttl_s:
                return self._lose(f"could not renew it for {self.ttl_s:g}s: {exc}")
            log.warning("renewing the beat lock failed, will retry: %s", exc)
            return True
        self._renewed_at = sent
        return True

    def _lose(self, why: str) -> bool:
        with self._once:
            if self.lost.is_set():
                return False
            self.reason = (
                f"beat lost its lock {keys.BEAT_LOCK} ({why}); stopping at once, "
                "since another beat may be running"
            )
            self.lost.set()
        log.error("%s", self.reason)
        if self._on_lost is not None:
            self._on_lost(self.reason)
        return False

    def start_renewing(self) -> None:
        """Renew every ``renew_every_s`` on a daemon thread until released or lost."""

        def loop() -> None:
            while not self._stop.wait(self.renew_every_s):
                if not self.renew():
                    return

        self._thread = threading.Thread(target=loop, daemon=True, name="beat-lock")
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the key if (and only if) it still holds our token."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        if self.lost.is_set() or self.token is None:
            return
        try:
            self._lock.release()  # Lua compare-and-delete
        except LockError:
            pass  # no longer ours: leave it
        except redis.RedisError as exc:
            log.warning("releasing the beat lock failed (it expires by itself): %s", exc)


# The lock the `sagellm beat` command took for this process; the scheduler Celery
# builds reads it on every tick.
_held_lock: BeatLock | None = None


def hold(lock: BeatLock) -> None:
    global _held_lock
    _held_lock = lock


def _stop_if_lost() -> None:
    lock = _held_lock
    if lock is not None and lock.lost.is_set():
        log.error("%s", lock.reason)
        raise SystemExit(1)


def mark_lost_engines(registry: Registry) -> list[str]:
    """Engines in a live state on a DOWN host become LOST; returns their ids.

    PENDING engines are left to their start task. STOPPING ones stay STOPPING: the stop
    was asked for and must not be forgotten (LOST would let a returning host's worker
    re-adopt the engine as RUNNING); the worker finishes it when the host is back.
    """
    lost = []
    for host in registry.hosts():
        if host.up:
            continue
        for rec in registry.engines(host=host.name, state=LIVE_STATES - {S.PENDING, S.STOPPING}):
            try:
                registry.transition(rec.id, S.LOST, error=f"host {host.name} is down")
                lost.append(rec.id)
            except SagellmError:
                pass  # changed concurrently
    if lost:
        log.warning("engines LOST with their hosts: %s", lost)
    return lost


class SagellmScheduler(PersistentScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from workers.celery_app import settings

        self._registry = Registry(connect(settings.redis_url))
        self._every = settings.health_interval_s
        self._last = 0.0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        _stop_if_lost()  # before anything: a beat without the lock schedules nothing
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            try:
                mark_lost_engines(self._registry)
            except Exception:  # Redis down: next tick
                log.exception("marking LOST engines failed")
        _stop_if_lost()
        delay = float(super().tick(*args, **kwargs))
        return min(delay, self._every)
