"""Apply a preset: all or nothing.

1. Plan every engine with the same placement code as a single start (a dry run stops
   here and reserves nothing).
2. Reserve all: if any engine cannot be placed, release those reserved so far and
   fail with its reasons; nothing was started.
3. Start all, then wait until each is RUNNING. If one fails (or time runs out), stop
   every engine this apply started (unless rollback is off) and fail with its reason.

Engines of the preset that already run (matched by preset and engine name) are left
alone, so applying again starts nothing new.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import SagellmError
from app.core.models import EngineRecord, EngineState
from app.core.presets import ACTIVE_STATES, Preset, PresetPlan, plan_preset
from app.services.cluster import Cluster, launch_engine
from app.services.engines import (
    discard_engine,
    reserve_engine,
    start_engine,
    stop_engine,
    wait_for_state,
    wait_until_settled,
)
from app.state.allocation import placement_hosts

S = EngineState


class PresetApplyError(SagellmError):
    """An apply that failed; carries the plan and what was rolled back."""

    def __init__(
        self, message: str, *, status_code: int, details: dict[str, Any], reasons: list[str]
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.details = details
        self.reasons = reasons

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["reasons"] = self.reasons
        out.update(self.details)
        return out


@dataclass
class ApplyResult:
    preset: str
    dry_run: bool
    plan: PresetPlan
    engines: list[EngineRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "dry_run": self.dry_run,
            "ok": self.plan.ok,
            "plan": self.plan.to_dict()["engines"],
            "engines": [r.to_dict() for r in self.engines],
            "skipped": self.skipped,
            "rolled_back": [],
        }


def _plan(cluster: Cluster, preset: Preset, policy: str | None) -> PresetPlan:
    return plan_preset(
        preset,
        placement_hosts(cluster.registry, cluster.ledger),
        policy=policy or cluster.settings.placement_policy,
        margin_mib=cluster.settings.gpu_safety_margin_mib,
        default_max_model_len=cluster.settings.default_max_model_len,
        running=cluster.registry.engines(state=ACTIVE_STATES),
    )


def _wait_through_drains(
    cluster: Cluster,
    started: list[tuple[str, EngineRecord]],
    stopped: list[str],
    on_progress: Callable[[str, EngineRecord], None] | None,
) -> None:
    """Rolled-back engines that served (RUNNING) drain before they stop (requests a
    client already sent them finish): wait until each is past DRAINING, all drains at
    once, ``SAGELLM_DRAIN_TIMEOUT_S`` and a little more at most."""
    deadline = time.monotonic() + cluster.settings.drain_timeout_s + 5.0
    for name, rec in started:
        if rec.id not in stopped:
            continue
        try:
            rec = wait_for_state(
                cluster,
                rec.id,
                set(S) - {S.DRAINING},
                max(0.0, deadline - time.monotonic()),
            )
        except SagellmError:
            continue  # gone (pruned): nothing to wait for
        if on_progress:
            on_progress(name, rec)


def apply_preset(
    cluster: Cluster,
    preset: Preset,
    *,
    dry_run: bool = False,
    rollback: bool = True,
    timeout_s: float = 900.0,
    policy: str | None = None,
    on_progress: Callable[[str, EngineRecord], None] | None = None,
) -> ApplyResult:
    """Plan, reserve all, start all, wait for RUNNING; roll back on failure."""
    plan = _plan(cluster, preset, policy)
    result = ApplyResult(
        preset.name, dry_run, plan, skipped=[e.name for e in plan.engines if e.action == "skip"]
    )
    if dry_run:
        return result
    if not plan.ok:
        bad = next(e for e in plan.engines if e.action == "error")
        raise PresetApplyError(
            f"preset {preset.name}: engine {bad.name!r} cannot be placed: {bad.error}; "
            "nothing was started",
            status_code=409,
            details={"plan": plan.to_dict()["engines"], "rolled_back": []},
            reasons=list(bad.reasons),
        )
    reserved: list[tuple[str, EngineRecord]] = []
    try:
        for pe in plan.engines:
            if pe.action == "start":
                reserved.append((pe.name, reserve_engine(cluster, pe.spec, policy)))
    except SagellmError as exc:
        # Someone took the room between plan and reserve: undo, start nothing.
        for _, rec in reserved:
            discard_engine(cluster, rec.id)
        raise PresetApplyError(
            f"preset {preset.name}: placement failed: {exc.message}; nothing was started",
            status_code=409,
            details={"plan": plan.to_dict()["engines"], "rolled_back": [r.id for _, r in reserved]},
            reasons=list(getattr(exc, "reasons", [])),
        ) from None
    standby: list[tuple[str, EngineRecord]] = []
    try:
        for pe in plan.engines:
            if pe.action == "standby":  # on demand: recorded, nothing taken
                standby.append((pe.name, start_engine(cluster, pe.spec, policy)))
    except SagellmError as exc:
        for _, rec in reserved + standby:
            discard_engine(cluster, rec.id)
        raise PresetApplyError(
            f"preset {preset.name}: {exc.message}; nothing was started",
            status_code=exc.status_code if exc.status_code < 500 else 409,
            details={"plan": plan.to_dict()["engines"], "rolled_back": []},
            reasons=list(getattr(exc, "reasons", [])),
        ) from None
    for name, rec in standby:
        if on_progress:
            on_progress(name, rec)
    started = [(name, launch_engine(cluster, rec)) for name, rec in reserved]
    deadline = time.monotonic() + timeout_s
    failure: tuple[str, EngineRecord] | None = None
    final: list[EngineRecord] = []
    for name, rec in started:
        rec = wait_until_settled(cluster, rec.id, max(0.0, deadline - time.monotonic()))
        if on_progress:
            on_progress(name, rec)
        final.append(rec)
        if rec.state is not S.RUNNING:
            failure = (name, rec)
            break
    if failure is None:
        result.engines = [rec for _, rec in standby] + final
        return result
    name, rec = failure
    why = (
        f"{rec.state.value}: {rec.last_error}"
        if rec.settled
        else f"not RUNNING within {timeout_s:g}s (still {rec.state.value})"
    )
    rolled_back = []
    if rollback:
        for _, other in standby:  # recorded only: forgotten at once
            discard_engine(cluster, other.id)
            rolled_back.append(other.id)
        for _, other in started:
            try:
                stop_engine(cluster, other.id)
                rolled_back.append(other.id)
            except SagellmError:
                pass
        _wait_through_drains(cluster, started, rolled_back, on_progress)
    raise PresetApplyError(
        f"preset {preset.name}: engine {name!r} ({rec.id}) did not start: {why}"
        + ("; rolled back the engines it started" if rollback else "; left running (no rollback)"),
        status_code=502,
        details={"plan": plan.to_dict()["engines"], "rolled_back": rolled_back},
        reasons=[],
    )
