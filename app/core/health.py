"""Health and restart rules, pure: what a probe result means for an engine.

The worker's health loop gathers facts (is the process alive, did ``/health``
answer) and asks this module what to do; the registry applies the transition.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from app.core.models import EngineState


class Verdict(enum.StrEnum):
    HEALTHY = "healthy"  # stay or become RUNNING
    FAILING = "failing"  # count the failure, keep the state
    UNHEALTHY = "unhealthy"  # RUNNING -> UNHEALTHY
    RESTART = "restart"  # give up on this process: kill it and restart (or fail)


@dataclass(frozen=True)
class HealthPolicy:
    unhealthy_after: int = 3  # failed probes in a row before UNHEALTHY
    restart_after: int = 6  # failed probes in a row before the process is replaced
    max_restarts: int = 3
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0

    def judge(self, state: EngineState, ok: bool, failures_before: int) -> tuple[Verdict, int]:
        """Verdict for a live process whose probe answered ``ok``; new failure count."""
        if ok:
            return Verdict.HEALTHY, 0
        failures = failures_before + 1
        if failures >= self.restart_after:
            return Verdict.RESTART, failures
        if failures >= self.unhealthy_after and state is EngineState.RUNNING:
            return Verdict.UNHEALTHY, failures
        return Verdict.FAILING, failures

    def can_restart(self, restart_count: int) -> bool:
        return restart_count < self.max_restarts

    def restart_delay(self, restart_count: int) -> float:
        """Exponential backoff: base, 2x base, 4x base ... capped."""
        return float(min(self.backoff_max_s, self.backoff_s * (2**restart_count)))
