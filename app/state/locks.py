"""Locks in Redis.

``BeatLock``: exactly one beat per cluster. A Redis key with the running beat's token
and a TTL that a thread renews. A beat that finds the key gone or someone else's stops
at once: another beat may already be running, and two beats would schedule everything
twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from app.state import keys

log = logging.getLogger(__name__)

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
