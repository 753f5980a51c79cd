"""Event-driven watch of this host's engines, in the worker process: readiness of a
start, and the exit of a process, each seen in milliseconds instead of at the next
Celery poll or health tick.

* **Readiness**: one short-lived thread per STARTING engine probes it
  (``supervise.check_start``: the runtime's probe, ``/health`` and ``/v1/models``) and
  marks it RUNNING the moment it answers. The interval grows with the time the engine
  has been starting: 2.5 % of it, from 20 ms up to 500 ms, so the probe adds at most
  ~2.5 % to a start (a 0.7 s stand-in is seen within 20 ms, a 3-minute vLLM load within
  0.5 s) and a long load costs two probes a second.
* **Exit**: one thread waits on a pidfd per engine process (``processes.
  open_exit_handle``), readable the moment the process exits: our children and adopted
  engines alike (after a worker restart, engines are no longer our children, but a
  pidfd works for any process). Where pidfds are not available, a process is checked
  by pid + create time every ``POLL_S``. An exit goes to ``supervise.on_exit`` at once
  (on a thread of its own: a stop holding the engine's lock must not delay the next
  exit), which reaps our child (its exit code stays available) and takes the
  dead-engine path.

What to watch comes from the records: ``track(rec)`` after a spawn or a relink (the
tasks call it), and ``sync`` from the heartbeat thread for anything else (rediscovery
after a worker restart relinks and adopts engines: they are watched again within a
heartbeat). The health loop still runs: it finds hung engines (a process that lives
but does not answer) and is the fallback for anything this misses.

The watch is per worker process and opt-in (``boot`` starts it): contexts built
without it (``tests/integration/inproc.py``) keep the step-by-step behaviour of
Celery tasks and the health loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from dataclasses import dataclass

from app.core.models import EngineRecord, EngineState
from workers.agent import supervise
from workers.agent.context import HostContext
from workers.host import processes

log = logging.getLogger(__name__)
S = EngineState

READY_MIN_S = 0.02
READY_MAX_S = 0.5
READY_SHARE = 0.025  # of the time the engine has been starting
POLL_S = 0.2  # processes without a pidfd: pid + create time checked this often
# States in which a process of an engine is expected to run (STOPPING: its stop kills
# it, and reads the outcome itself; LOST: the host's return is handled by the loop).
EXIT_WATCHED = frozenset({S.STARTING, S.RUNNING, S.UNHEALTHY})


def ready_interval(starting_for_s: float) -> float:
    """How long to wait before the next readiness probe of an engine that has been
    starting for ``starting_for_s`` seconds."""
    return min(READY_MAX_S, max(READY_MIN_S, starting_for_s * READY_SHARE))


@dataclass(frozen=True)
class WatchedProcess:
    engine_id: str
    pid: int
    create_time: float | None


class EngineWatch:
    """The worker process's watch of its engines (see the module docstring)."""

    def __init__(self, ctx: HostContext) -> None:
        self.ctx = ctx
        self._stopped = threading.Event()
        self._guard = threading.Lock()
        self._starting: set[str] = set()  # engines with a readiness thread
        self._again: set[str] = set()  # tracked again while their thread was ending
        self._watched: set[WatchedProcess] = set()  # processes whose exit is watched
        self._new: list[WatchedProcess] = []  # to be added by the exit thread
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._exit_thread = threading.Thread(
            target=self._exit_loop, name="sagellm-exit-watch", daemon=True
        )

    # ------------------------------------------------------------------ control

    def start(self) -> EngineWatch:
        self._exit_thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    # ------------------------------------------------------------------ what to watch

    def track(self, rec: EngineRecord | None) -> None:
        """Watch what ``rec`` (as just read or written) has running: its readiness when
        STARTING, its process's exit when one should run. Idempotent."""
        if rec is None or rec.host != self.ctx.host or self._stopped.is_set():
            return
        if rec.pid is not None and rec.state in EXIT_WATCHED:
            self._watch_exit(WatchedProcess(rec.id, rec.pid, rec.process_create_time))
        if rec.state is S.STARTING:
            self._watch_ready(rec)

    def sync(self) -> None:
        """Watch every engine of this host that its record says is starting or running
        (after rediscovery, or anything that did not call ``track``)."""
        for rec in self.ctx.registry.engines(host=self.ctx.host):
            self.track(rec)

    def watching(self) -> tuple[set[str], set[WatchedProcess]]:
        """(engines whose readiness is probed, processes whose exit is watched)."""
        with self._guard:
            return set(self._starting), set(self._watched)

    # ------------------------------------------------------------------ readiness

    def _watch_ready(self, rec: EngineRecord) -> None:
        with self._guard:
            if rec.id in self._starting:
                self._again.add(rec.id)  # its thread may be ending: it goes on instead
                return
            self._starting.add(rec.id)
        began = rec.process_create_time or time.time()
        threading.Thread(
            target=self._ready_loop,
            args=(rec.id, began),
            name=f"sagellm-ready-{rec.id}",
            daemon=True,
        ).start()

    def _ready_loop(self, engine_id: str, began: float) -> None:
        try:
            while not self._stopped.is_set():
                try:
                    status = supervise.check_start(self.ctx, engine_id)
                except Exception:  # Redis down, a probe's bug: the health loop remains
                    log.exception("readiness check of %s failed", engine_id)
                    status = "waiting"
                if status != "waiting":
                    with self._guard:
                        if engine_id in self._again:  # a new start of it: watch that
                            self._again.discard(engine_id)
                            began = time.time()
                            continue
                        self._starting.discard(engine_id)
                    log.debug("engine %s: readiness watch ends: %s", engine_id, status)
                    return
                self._stopped.wait(ready_interval(time.time() - began))
        finally:
            with self._guard:
                self._starting.discard(engine_id)
                self._again.discard(engine_id)

    # ------------------------------------------------------------------ exit

    def _watch_exit(self, proc: WatchedProcess) -> None:
        with self._guard:
            if proc in self._watched:
                return
            self._watched.add(proc)
            self._new.append(proc)
        self._wake()

    def _exit_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self._watch_exits()
            except Exception:  # never leave the worker without its exit watch
                log.exception("exit watch failed; starting it again")
                with self._guard:  # watch again all that was watched
                    self._new = list(self._watched)
                self._stopped.wait(POLL_S)

    def _watch_exits(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        by_fd: dict[int, WatchedProcess] = {}
        polled: set[WatchedProcess] = set()  # no pidfd: checked every POLL_S
        try:
            while not self._stopped.is_set():
                with self._guard:
                    new, self._new = self._new, []
                for proc in new:
                    try:
                        fd = processes.open_exit_handle(proc.pid, proc.create_time)
                    except ProcessLookupError:
                        self._exited(proc)
                        continue
                    if fd is None:
                        polled.add(proc)
                    else:
                        by_fd[fd] = proc
                        poller.register(fd, select.POLLIN)
                    log.info(
                        "engine %s: watching process %s for its exit (%s)",
                        proc.engine_id,
                        proc.pid,
                        "polled" if fd is None else "pidfd",
                    )
                try:
                    events = poller.poll(POLL_S * 1000 if polled else None)
                except InterruptedError:
                    continue
                for fd, _ in events:
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError, OSError):
                            os.read(self._wake_r, 4096)
                        continue
                    proc = by_fd.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    self._exited(proc)
                for proc in list(polled):
                    if not processes.is_alive(proc.pid, proc.create_time):
                        polled.discard(proc)
                        self._exited(proc)
        finally:
            for fd in by_fd:
                os.close(fd)

    def _exited(self, proc: WatchedProcess) -> None:
        processes.reap_children()  # our child's exit code, kept for whoever asks
        with self._guard:
            self._watched.discard(proc)
        threading.Thread(
            target=self._handle_exit,
            args=(proc,),
            name=f"sagellm-exited-{proc.engine_id}",
            daemon=True,
        ).start()

    def _handle_exit(self, proc: WatchedProcess) -> None:
        try:
            outcome = supervise.on_exit(self.ctx, proc.engine_id, proc.pid)
            log.info("engine %s: process %s exited: %s", proc.engine_id, proc.pid, outcome)
        except Exception:  # Redis down: the health loop and rediscovery find it later
            log.exception("handling the exit of engine %s failed", proc.engine_id)
