"""A long-lived subscription to ``keys.ENGINE_CHANGES`` (every record write publishes
``{"id", "state", "seq"}`` there, in the same step as the write: ``app.state.registry``).

For a process that keeps a cached view of the records (the gateway's discovery): a
daemon thread per process hears each change and calls ``on_change(id, state)``; after a
(re)subscription, when changes may have been missed, it calls ``on_reset()``. While the
subscription is down (``up`` is False) it retries with a backoff, and the caller falls
back to re-reading on its own schedule. gevent-friendly: under gunicorn's gevent worker
the thread is a greenlet and the socket wait yields.

``seq`` is the write number (``app.state.write_seq``) up to which every write has been
handed to ``on_change`` or preceded the last ``on_reset``: on subscription it is the
number Redis had once the subscription was confirmed (read before ``on_reset``, set
after it), and each notice moves it to its own number once ``on_change`` returned.
It stays where it was while the subscription is down. A number, not a time: it means
the same on every machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable

import redis

from app.state import keys
from app.state.write_seq import current_seq, notice_seq

log = logging.getLogger(__name__)
PING_EVERY_S = 5.0  # a dead connection shows itself when a ping cannot be sent
RETRY_FIRST_S, RETRY_MAX_S = 0.2, 5.0

OnChange = Callable[[str, str], None]


class ChangeFeed:
    """Hears every engine record write in this process (see the module docstring)."""

    def __init__(
        self, client: redis.Redis, on_change: OnChange, on_reset: Callable[[], None]
    ) -> None:
        self._r = client
        self._on_change = on_change
        self._on_reset = on_reset
        self._pid: int | None = None
        self._guard = threading.Lock()
        self._subscribed = False
        self.up = False
        self.seq = 0  # see the module docstring

    def start(self) -> None:
        """Start the subscriber thread of this process (once; again in a forked child,
        which does not inherit its parent's threads)."""
        if self._pid == os.getpid():
            return
        with self._guard:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self.up = False
            threading.Thread(target=self._run, daemon=True, name="engine-change-feed").start()

    def _run(self) -> None:
        wait = threading.Event()  # never set: an uninterruptible sleep
        delay = RETRY_FIRST_S
        while True:
            self._subscribed = False
            try:
                self._listen()
            except Exception as exc:  # Redis down, a reset connection: retry
                log.info("engine change feed down (%s); retrying", exc)
            self.up = False
            self._on_reset()  # changes may have been missed meanwhile
            delay = RETRY_FIRST_S if self._subscribed else min(delay * 2, RETRY_MAX_S)
            wait.wait(delay)

    def _listen(self) -> None:
        pubsub = self._r.pubsub()
        try:
            pubsub.subscribe(keys.ENGINE_CHANGES)
            since_ping = 0.0
            while True:
                msg = pubsub.get_message(timeout=1.0)
                if msg is None:
                    since_ping += 1.0
                    if since_ping >= PING_EVERY_S:
                        pubsub.ping()
                        since_ping = 0.0
                    continue
                if msg["type"] == "subscribe":
                    known = current_seq(self._r)  # every write up to it came before
                    self.up = self._subscribed = True
                    self._on_reset()  # what changed before we listened is unknown
                    self.seq = known
                elif msg["type"] == "message":
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        notice = json.loads(msg["data"])
                        self._on_change(str(notice["id"]), str(notice["state"]))
                        self.seq = max(self.seq, notice_seq(notice) or 0)
        finally:
            self.up = False
            with contextlib.suppress(Exception):
                pubsub.close()


__all__ = ["ChangeFeed"]
