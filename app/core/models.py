"""Plain data of the domain: engine and host records and the engine state machine.

What a user asks for (``EngineSpec``) is in ``app.core.spec``; GPUs as inventories
report them (``GpuInfo``, ``GpuCapacity``, MiB/GB conversions) in ``app.core.gpus``.

No Redis, Flask or Celery here. Records serialise to and from plain dicts (JSON).
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from app.core.errors import IllegalTransition
from app.core.gpus import GpuInfo
from app.core.spec import EngineSpec

# ---------------------------------------------------------------------------- engines


class EngineState(enum.StrEnum):
    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"  # being stopped: no new request; in-flight ones finish
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    LOST = "LOST"
    STANDBY = "STANDBY"  # on demand: known to the gateway, nothing held, no process


S = EngineState
# The state machine of ARCHITECTURE.md. LOST is reachable from any live state (its
# host's heartbeat expired) and leaves to whatever the host's worker finds on return.
# DRAINING is a stop that first lets the requests in flight finish: entered from a
# serving engine only, it leaves only to STOPPING (or LOST, and back from LOST).
# STANDBY is an on-demand engine at rest: a cold start (``wake``) makes it PENDING, a
# stop of it STOPPED; an idle stop or an eviction brings it back from STOPPING, and a
# cold start that failed from STARTING or FAILED.
ALLOWED_TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    S.PENDING: frozenset({S.STARTING, S.FAILED, S.STOPPING, S.LOST}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.STOPPING, S.LOST, S.STANDBY}),
    S.RUNNING: frozenset({S.UNHEALTHY, S.DRAINING, S.STOPPING, S.LOST}),
    S.UNHEALTHY: frozenset({S.RUNNING, S.STARTING, S.FAILED, S.DRAINING, S.STOPPING, S.LOST}),
    S.DRAINING: frozenset({S.STOPPING, S.LOST}),
    S.STOPPING: frozenset({S.STOPPED, S.LOST, S.STANDBY}),
    S.STOPPED: frozenset(),
    # restart with backoff; a stop while a restart is pending ends it at once
    S.FAILED: frozenset({S.STARTING, S.STOPPED, S.STANDBY}),
    S.STANDBY: frozenset({S.PENDING, S.STOPPED}),
    S.LOST: frozenset(
        {S.RUNNING, S.UNHEALTHY, S.STARTING, S.FAILED, S.DRAINING, S.STOPPING, S.STOPPED}
        | {S.STANDBY}
    ),
}
TERMINAL_STATES = frozenset({S.STOPPED, S.FAILED})
# States an engine may wait in for a restart (with ``next_restart_at`` set).
_RESTARTABLE = frozenset({S.FAILED, S.UNHEALTHY, S.LOST})
LIVE_STATES = frozenset({S.PENDING, S.STARTING, S.RUNNING, S.UNHEALTHY, S.DRAINING, S.STOPPING})
# Being stopped: the gateway sends nothing new; the engine keeps its room until STOPPED.
STOPPING_STATES = frozenset({S.DRAINING, S.STOPPING})


def _waiting_state(state: EngineState) -> EngineState:
    """The state an engine waits in while its restart backs off: a process that was
    serving (RUNNING/UNHEALTHY) waits as UNHEALTHY; one that never became ready
    (STARTING) or whose host vanished (LOST) as FAILED."""
    if state in (S.RUNNING, S.UNHEALTHY):
        return S.UNHEALTHY
    return S.FAILED


def check_transition(current: EngineState, new: EngineState) -> None:
    """The one place that decides whether an engine may move from ``current`` to ``new``."""
    if new not in ALLOWED_TRANSITIONS[current]:
        raise IllegalTransition(f"engine state {current.value} -> {new.value} is not allowed")


@dataclass
class GpuAssignment:
    index: int
    uuid: str
    memory_mib: int


@dataclass
class EngineRecord:
    """An engine as the registry knows it."""

    id: str
    spec: EngineSpec
    state: EngineState = EngineState.PENDING
    host: str | None = None
    address: str | None = None
    port: int | None = None
    gpus: list[GpuAssignment] = field(default_factory=list)
    memory_per_gpu_mib: int = 0
    launch: dict[str, Any] = field(default_factory=dict)  # runtime flags from the estimate
    pid: int | None = None
    process_create_time: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    state_changed_at: float = field(default_factory=time.time)
    restart_count: int = 0
    last_error: str | None = None
    task_id: str | None = None
    exit_code: int | None = None
    log_path: str | None = None
    start_deadline: float | None = None  # STARTING: fail if not ready by then
    next_restart_at: float | None = None  # set while a restart is pending (backoff)
    health_failures: int = 0  # failed health checks in a row
    last_health_at: float | None = None
    running_since: float | None = None  # when this process became ready (restart budget)
    # Set while a running engine could not re-take its reservation (someone else took
    # the room while Redis was lost): the engine is UNHEALTHY until it can.
    reservation_error: str | None = None
    # Why its last process ended (``app.core.failures.Failure.to_dict()``: reason,
    # evidence, advice, exit code, signal), how often each reason ended one (the
    # ``sagellm_engine_failures_total`` metric sums them), and how many automatic
    # remediations (a shorter max length, another GPU) it has had.
    failure: dict[str, Any] | None = None
    failure_counts: dict[str, int] = field(default_factory=dict)  # deaths by reason
    remediations: int = 0
    # Set by a stop that drains first (``start_drain``): the time by which the host's
    # worker stops it even if requests are still in flight. Kept after DRAINING (a
    # LOST engine returns to its drain).
    drain_deadline: float | None = None
    # On demand and idle stops (``EngineSpec.on_demand``, ``idle_timeout_s``): when the
    # gateway last sent it a request and when it will be stopped for idleness (written
    # by its host's idle check); whether its stop ends in STANDBY (an idle stop or an
    # eviction of an on-demand engine) and when its current cold start began.
    last_request_at: float | None = None
    idle_stops_at: float | None = None
    standby_after_stop: bool = False
    cold_start_at: float | None = None
    cold_start_s: float | None = None  # how long its last cold start took to RUNNING
    # Eviction: a victim names the engine its room was handed to (``evicted_for``; it
    # holds no reservation while it drains and stops); that engine names the victims
    # whose processes must be gone before it spawns (``waits_for``).
    evicted_for: str | None = None
    waits_for: list[str] = field(default_factory=list)
    # An external engine (``app.core.external``): an endpoint sagellm did not start, at
    # this base URL. No host, port, GPUs or process; RUNNING while its probe passes,
    # UNHEALTHY otherwise; forgotten (deleted), never stopped. Its API key is kept
    # apart (``app.state.external_keys``): the record says only whether it has one.
    external_url: str | None = None
    api_key_set: bool = False

    # ------------------------------------------------------------------ the rules
    # Every change of state and the bookkeeping that goes with it is one of the
    # methods below; each checks its preconditions and raises ``IllegalTransition``
    # (nothing changed) when they do not hold, so a writer that lost a race leaves the
    # record as the winner wrote it. The registry applies them in one atomic write.

    @property
    def owns_nothing(self) -> bool:
        """STOPPED, or FAILED with no restart pending: holds no GPU memory, no port.

        Every write that makes this true releases the reservation in the same step.
        """
        return self.state in (EngineState.STOPPED, EngineState.STANDBY) or (
            self.state is EngineState.FAILED and not self.restart_pending
        )

    @property
    def restart_pending(self) -> bool:
        """A restart is scheduled (``next_restart_at``); the engine keeps its room."""
        return self.next_restart_at is not None

    def restart_due(self, now: float) -> bool:
        """A restart is pending and its time (``next_restart_at``) has come by ``now``."""
        return self.next_restart_at is not None and now >= self.next_restart_at

    @property
    def awaits_spawn(self) -> bool:
        """PENDING, or waiting for a restart: the next spawn starts its process."""
        return self.state is EngineState.PENDING or (
            self.state in _RESTARTABLE and self.restart_pending
        )

    @property
    def settled(self) -> bool:
        """A start has an outcome: RUNNING, or nothing is held any more (STOPPED, FAILED
        with no restart pending)."""
        return self.state is EngineState.RUNNING or self.owns_nothing

    @property
    def stopped_or_stopping(self) -> bool:
        """Stopped, or a stop is under way (DRAINING, STOPPING): nothing more to stop,
        restart or fail; what is left is the stop's to finish."""
        return self.state in STOPPING_STATES or self.state is EngineState.STOPPED

    @property
    def in_service(self) -> bool:
        """Serving, or on its way to serving without anyone acting (PENDING, STARTING,
        UNHEALTHY, LOST, a restart pending): the model it serves exists. Not when it is
        being stopped (DRAINING, STOPPING), stopped, or failed for good: the gateway
        sends it no new request."""
        return self.state not in STOPPING_STATES and not self.owns_nothing

    @property
    def drainable(self) -> bool:
        """A serving process may have requests in flight: RUNNING, or UNHEALTHY with its
        process (not waiting for a restart). A stop of it may drain first."""
        return (
            self.state in (EngineState.RUNNING, EngineState.UNHEALTHY)
            and not self.restart_pending
            and self.pid is not None
        )

    def drain_over(self, now: float) -> bool:
        """Its drain deadline has passed (False when it is not draining)."""
        return self.drain_deadline is not None and now >= self.drain_deadline

    def _refuse(self, why: str) -> IllegalTransition:
        return IllegalTransition(f"engine {self.id} is {self.state.value}: {why}")

    def _forget_process(self) -> None:
        self.pid = self.process_create_time = self.running_since = None

    def start_drain(self, deadline: float) -> None:
        """A stop that lets the requests in flight finish first: a serving engine
        (``drainable``) becomes DRAINING until ``deadline`` at the latest; the gateway
        sends it nothing new, and its host's worker stops it (``request_stop``) once
        nothing is in flight or the deadline passed. It keeps its room meanwhile."""
        if not self.drainable:
            raise self._refuse("only a serving engine with its process drains")
        self.transition(EngineState.DRAINING)
        self.drain_deadline = deadline

    def request_stop(self) -> None:
        """A stop was asked for: live engines (DRAINING ones included: the drain is over
        or skipped) become STOPPING; a FAILED engine with a restart pending is STOPPED
        at once. Either way a pending restart is cancelled (in the caller's write).
        Already stopping or stopped: nothing changes. An external engine is refused:
        nothing of it runs here to stop (it is forgotten: its record is deleted)."""
        if self.external_url is not None:
            raise self._refuse("an external engine is not stopped here; deleting forgets it")
        if self.state in (EngineState.STOPPED, EngineState.STOPPING):
            return
        if self.state is EngineState.STANDBY:
            self.transition(EngineState.STOPPED, error="stopped while on standby")
        elif self.state is EngineState.FAILED:
            if self.restart_pending:
                self.transition(EngineState.STOPPED, error="stopped while a restart was pending")
        else:
            self.transition(EngineState.STOPPING)
        self.next_restart_at = None

    def mark_stopped(self) -> None:
        """Its process is gone: STOPPED (from STOPPING, or an engine with no process; a
        DRAINING engine whose process is gone has nothing left to drain). An idle stop
        or an eviction of an on-demand engine ends in STANDBY instead."""
        if self.state is EngineState.DRAINING:
            self.transition(EngineState.STOPPING)
        if self.standby_after_stop and self.state is EngineState.STOPPING:
            self.to_standby()
            return
        self.transition(EngineState.STOPPED)
        self.pid = self.process_create_time = None

    # ------------------------------------------------------------------ on demand

    def to_standby(self, error: str | None = None) -> None:
        """Back at rest (an on-demand engine whose process is gone): STANDBY, holding
        nothing (the write releases its room), placement forgotten."""
        self.transition(EngineState.STANDBY, error=error)
        self.host = self.address = self.port = None
        self.gpus, self.memory_per_gpu_mib, self.launch = [], 0, {}
        self._forget_process()
        self.next_restart_at = self.start_deadline = self.drain_deadline = None
        self.standby_after_stop, self.evicted_for, self.waits_for = False, None, []
        self.idle_stops_at, self.cold_start_at, self.health_failures = None, None, 0

    def wake(self, at: float) -> None:
        """A cold start (the gateway's first request): STANDBY -> PENDING, placed and
        reserved by the caller in the same write. Anything else is refused, so of many
        concurrent wakers exactly one wins."""
        if self.state is not EngineState.STANDBY:
            raise self._refuse("only a STANDBY engine is woken")
        self.transition(EngineState.PENDING)
        self.cold_start_at = self.last_request_at = at
        self.last_error = None

    def cold_start_failed(self, error: str, *, pid: int | None, restart_count: int) -> None:
        """Its cold start died before it was ready: back to STANDBY (holding nothing),
        saying why; the waiting requests get the reason, the next request tries again."""
        if self.pid != pid or self.state is not EngineState.STARTING or not self.spec.on_demand:
            raise self._refuse(f"not the cold start of process {pid}")
        self.restart_count = restart_count
        self.to_standby(error)
        self.last_error = error

    def evict_for(self, engine_id: str, deadline: float) -> None:
        """Its room is handed to ``engine_id`` (in the same write that reserves it):
        an idle on-demand engine drains and stops back to STANDBY, holding no
        reservation meanwhile (the new engine spawns only once this one's process is
        gone)."""
        if not self.spec.on_demand or not self.drainable:
            raise self._refuse("only a serving on-demand engine is evicted")
        self.start_drain(deadline)
        self.standby_after_stop = True
        self.evicted_for = engine_id

    def idle_stop(self, deadline: float) -> None:
        """No request for ``idle_timeout_s``: drain and stop, to STANDBY when on demand
        (STOPPED otherwise)."""
        if self.spec.idle_timeout_s is None or not self.drainable:
            raise self._refuse("only a serving engine with an idle timeout is idle-stopped")
        self.start_drain(deadline)
        self.standby_after_stop = self.spec.on_demand

    def mark_starting(
        self,
        pid: int,
        create_time: float,
        *,
        log_path: str,
        start_deadline: float,
        count_restart: bool = True,
    ) -> None:
        """A process was spawned for an engine that awaited it (PENDING, or a restart
        pending): STARTING, with the process recorded. A restart counts against the
        budget unless ``count_restart`` is False (a restart a person asked for)."""
        if not self.awaits_spawn:
            raise self._refuse("it does not wait for a start")
        is_restart = self.state is not EngineState.PENDING
        self.transition(EngineState.STARTING)
        if is_restart and count_restart:
            self.restart_count += 1
        self.pid, self.process_create_time = pid, create_time
        self.log_path = log_path
        self.start_deadline = start_deadline
        self.next_restart_at = None
        self.health_failures = 0
        self.exit_code = None
        self.running_since = None

    def link_process(
        self, pid: int, create_time: float, *, log_path: str, start_deadline: float
    ) -> None:
        """Record a live process of this engine that the record lost track of (a worker
        died between spawn and record). An engine that awaited its (re)start becomes
        STARTING; a pending restart is cancelled (its process is there)."""
        if self.owns_nothing:
            raise self._refuse("it holds no room for a process")
        if self.state is EngineState.PENDING or (
            self.state in (EngineState.FAILED, EngineState.UNHEALTHY) and self.restart_pending
        ):
            self.transition(EngineState.STARTING)
            self.start_deadline = start_deadline
            self.health_failures = 0
        self.pid, self.process_create_time = pid, create_time
        self.next_restart_at = None
        self.log_path = self.log_path or log_path

    def adopt(self, pid: int, create_time: float, *, ready: bool, start_deadline: float) -> None:
        """Re-create a lost record (read back from the host's manifest) in the state its
        live process shows: RUNNING when it answers, else STARTING. Not a transition:
        there was no record to move."""
        now = time.time()
        self.pid, self.process_create_time = pid, create_time
        self.state = EngineState.RUNNING if ready else EngineState.STARTING
        self.start_deadline = None if ready else start_deadline
        self.running_since = now if ready else None
        self.state_changed_at = self.updated_at = now
        self.next_restart_at, self.health_failures = None, 0
        self.reservation_error = None
        self.last_error = "re-adopted by rediscovery after the registry lost it"

    def mark_running(self, pid: int | None) -> None:
        """The process ``pid`` of a STARTING engine is ready: RUNNING (UNHEALTHY when it
        runs without its reservation)."""
        if self.state is not EngineState.STARTING or self.pid != pid:
            raise self._refuse(f"not the STARTING engine of process {pid}")
        self.transition(EngineState.RUNNING)
        self.health_failures = 0
        self.last_health_at = self.running_since = time.time()
        if self.cold_start_at is not None:  # a cold start is over
            self.cold_start_s = round(self.running_since - self.cold_start_at, 3)
            self.cold_start_at = None
            self.restart_count = 0  # the budget counts failed cold starts in a row
        if self.reservation_error:
            self.transition(EngineState.UNHEALTHY, error=self.reservation_error)

    def _check_serving(self, pid: int | None) -> None:
        if self.pid != pid or self.state not in (EngineState.RUNNING, EngineState.UNHEALTHY):
            raise self._refuse(f"not the serving engine of process {pid}")

    def mark_healthy(self, pid: int | None) -> None:
        """A health check of process ``pid`` passed: the count of failures is reset and
        an UNHEALTHY engine is RUNNING again (unless it runs without its reservation)."""
        self._check_serving(pid)
        self.health_failures = 0
        self.last_health_at = time.time()
        if self.state is EngineState.UNHEALTHY and not self.reservation_error:
            self.transition(EngineState.RUNNING)

    def count_failed_checks(self, pid: int | None, failures: int, *, unhealthy: str | None) -> None:
        """Health checks of process ``pid`` failed ``failures`` times in a row;
        ``unhealthy``: the reason it is now UNHEALTHY (None: only counted)."""
        self._check_serving(pid)
        self.health_failures = failures
        if unhealthy is not None:
            self.transition(EngineState.UNHEALTHY, error=unhealthy)

    def return_from_lost(self, *, answers: bool, reserved: bool, detail: str) -> None:
        """Its host is back and the process lives: RUNNING if it ``answers`` its health
        check and holds its reservation, else UNHEALTHY saying why. An engine that was
        draining (``drain_deadline`` set) goes back to DRAINING: its stop goes on."""
        if self.state is not EngineState.LOST:
            raise self._refuse("it is not LOST")
        if self.drain_deadline is not None:
            self.transition(EngineState.DRAINING)
            return
        healthy = answers and reserved
        self.transition(EngineState.RUNNING if healthy else EngineState.UNHEALTHY)
        if not healthy:
            self.last_error = self.reservation_error or detail
        self.health_failures = 0 if answers else 1

    def mark_unreserved(self, message: str) -> None:
        """It runs, but its reservation could not be re-taken (someone took the room
        while Redis was lost): UNHEALTHY (not routed to) until it can."""
        self.reservation_error = self.last_error = message
        if self.state is EngineState.RUNNING:
            self.transition(EngineState.UNHEALTHY)

    def mark_reserved(self) -> None:
        """Its reservation is held again (see ``mark_unreserved``)."""
        if self.reservation_error:
            self.reservation_error = None
            self.last_error = "reservation re-taken"

    def pend_restart(
        self,
        error: str,
        *,
        pid: int | None,
        exit_code: int | None,
        restart_count: int,
        at: float,
    ) -> None:
        """Its process ``pid`` died: wait for a restart at ``at`` (backoff), keeping its
        room. A process that was serving waits as UNHEALTHY, one that never became ready
        (or whose host vanished) as FAILED; both move to STARTING on restart. An engine
        being stopped (DRAINING included) is left to its stop."""
        if self.pid != pid or self.stopped_or_stopping:
            raise self._refuse(f"process {pid} is not its process any more")
        target = _waiting_state(self.state)
        if self.state is not target:
            self.transition(target, error=error)
        self.last_error = error
        self.exit_code = exit_code
        self.restart_count = restart_count
        self._forget_process()
        self.next_restart_at = at

    def request_restart(self) -> None:
        """A person asked for a restart: due at once, keeping its room (its process is
        being stopped by the caller). A PENDING engine stays PENDING."""
        if self.stopped_or_stopping or self.owns_nothing:
            raise self._refuse("only an engine that holds its room restarts in place")
        if self.state is not EngineState.PENDING:
            target = _waiting_state(self.state)
            if self.state is not target:
                self.transition(target)
        self._forget_process()
        self.next_restart_at = time.time()
        self.last_error = "restart requested"

    def retry_failed(self) -> None:
        """A FAILED engine (that holds nothing) a person restarts: placed again by the
        caller in the same write, its restart due at once with a fresh budget."""
        if self.state is not EngineState.FAILED or not self.owns_nothing:
            raise self._refuse("only an engine that failed for good is retried")
        self.restart_count = 0
        self.next_restart_at = time.time()

    def fail(self, error: str, *, pid: int | None = None) -> None:
        """FAILED for good, saying why; no restart pending, no process. The write that
        applies it releases the engine's GPU memory and port.

        ``pid``: fail only while that process (or none) is the engine's. An engine being
        stopped (DRAINING, STOPPING) is left to its stop."""
        if pid is not None and self.pid not in (pid, None):
            raise self._refuse(f"another process ({self.pid}) took over from {pid}")
        if self.stopped_or_stopping:
            raise self._refuse("it is being stopped")
        if self.state is EngineState.RUNNING:
            self.transition(EngineState.UNHEALTHY)
        if self.state is not EngineState.FAILED:
            self.transition(EngineState.FAILED, error=error)
        self.last_error = error
        self.next_restart_at = None
        self._forget_process()

    @property
    def base_url(self) -> str | None:
        if self.external_url is not None:
            return self.external_url
        if self.address is None or self.port is None:
            return None
        return f"http://{self.address}:{self.port}"

    def transition(self, new: EngineState, *, error: str | None = None) -> None:
        """Move to ``new`` (via ``check_transition``), stamping the time."""
        check_transition(self.state, new)
        now = time.time()
        self.state = new
        self.state_changed_at = now
        self.updated_at = now
        if error is not None:
            self.last_error = error

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["state"] = self.state.value
        d["base_url"] = self.base_url
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineRecord:
        data = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        data["spec"] = EngineSpec.from_dict(d["spec"])
        data["state"] = EngineState(d["state"])
        data["gpus"] = [GpuAssignment(**g) for g in d.get("gpus", [])]
        return cls(**data)


# ---------------------------------------------------------------------------- hosts


@dataclass
class HostRecord:
    """What a worker publishes with each heartbeat."""

    name: str
    address: str
    port_range: tuple[int, int]
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_source: str = "none"
    engines: list[str] = field(default_factory=list)
    busy_ports: list[int] = field(default_factory=list)  # in range, held by other programs
    worker_version: str = ""
    heartbeat_at: float = field(default_factory=time.time)
    up: bool = True  # derived on read: False when the heartbeat key expired

    @property
    def heartbeat_age_s(self) -> float:
        return max(0.0, time.time() - self.heartbeat_at)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = [g.to_dict() for g in self.gpus]
        d["port_range"] = list(self.port_range)
        d.pop("up")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, up: bool = True) -> HostRecord:
        return cls(
            name=d["name"],
            address=d["address"],
            port_range=(int(d["port_range"][0]), int(d["port_range"][1])),
            gpus=[GpuInfo.from_dict(g) for g in d.get("gpus", [])],
            gpu_source=d.get("gpu_source", "none"),
            engines=list(d.get("engines", [])),
            busy_ports=[int(p) for p in d.get("busy_ports", [])],
            worker_version=d.get("worker_version", ""),
            heartbeat_at=float(d.get("heartbeat_at", 0)),
            up=up,
        )
