"""Cold starts: a request for a model whose engines are all on STANDBY starts one.

``ColdStarter.bring_up`` runs in the request's own greenlet (or thread): it wakes one
STANDBY engine of the model unless one is already waking (PENDING or STARTING), then
waits, woken by each write of that engine's record (``Registry.wait``: pub/sub, no
polling), until it is RUNNING, gives up (back to STANDBY or FAILED: a 503 with the
reason and what to do), or ``timeout_s`` passed. Any number of requests, through any
number of gateway processes, start exactly one engine: the wake is an atomic
``STANDBY -> PENDING`` (``app.services.on_demand.wake_engine``); a request that loses
it waits for the winner. A client that goes away while waiting cancels nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from app.core.errors import IllegalTransition, NotFoundError, PlacementError, SagellmError
from app.core.models import EngineRecord, EngineState
from app.gateway.discovery import Known

S = EngineState
# States of an on-demand engine on its way up after a wake.
_WAKING = frozenset({S.PENDING, S.STARTING})


class ColdStartFailed(SagellmError):
    """The cold start did not bring the model up: 503, with why and what to do."""

    status_code = 503


@dataclass
class ColdStarter:
    wake: Callable[[str], EngineRecord]  # app.services.on_demand.wake_engine
    wait: Callable[[str, Callable[[EngineRecord], bool], float], EngineRecord]
    timeout_s: float

    def bring_up(self, model: str, engines: list[Known]) -> EngineRecord:
        """One RUNNING engine of ``model``, started if need be; ``ColdStartFailed``."""
        deadline = time.monotonic() + self.timeout_s
        waking = [k for k in engines if k.state in _WAKING]
        standby = [k for k in engines if k.state is S.STANDBY]
        target: str | None = waking[0].engine_id if waking else None
        refusal: PlacementError | None = None
        for k in standby if target is None else ():
            try:
                target = self.wake(k.engine_id).id
                break
            except IllegalTransition:  # another request woke it first: wait for that one
                target = k.engine_id
                break
            except PlacementError as exc:
                refusal = exc
            except NotFoundError:
                continue
        if target is None:
            why = refusal.message if refusal is not None else "no engine of it can be started"
            raise ColdStartFailed(
                f"model {model!r} is on standby and could not be started: {why}. "
                "Free GPU memory (stop an engine) or retry later"
            )
        rec = self.wait(target, _settled, max(0.0, deadline - time.monotonic()))
        if rec.state is S.RUNNING:
            return rec
        if rec.state in _WAKING or rec.restart_pending:
            raise ColdStartFailed(
                f"model {model!r}: engine {rec.id} is still {rec.state.value} after "
                f"{self.timeout_s:g}s (SAGELLM_COLD_START_TIMEOUT_S); retry later"
            )
        raise ColdStartFailed(f"model {model!r}: the cold start of {rec.id} failed: {_why(rec)}")


def _settled(rec: EngineRecord) -> bool:
    """The wait is over: RUNNING, or the start gave up (back on STANDBY, FAILED, stopped)."""
    if rec.state is S.RUNNING:
        return True
    return rec.state not in _WAKING and not rec.restart_pending


def _why(rec: EngineRecord) -> str:
    failure = rec.failure or {}
    reason, advice = failure.get("reason"), failure.get("advice")
    text = f"{reason}: " if reason else ""
    text += rec.last_error or f"it is {rec.state.value}"
    if advice:
        text += f". {advice}"
    return text
