"""The dry run of a preset: where each engine would go, engine after engine, each
seeing the reservations of the ones before it. Pure: plain data in, plain data out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app.core.allocation import Allocation, plan
from app.core.errors import PlacementError, ValidationError
from app.core.gpus import mib_to_gb
from app.core.models import EngineRecord, EngineState
from app.core.placement import PlacementHost, PlacementPolicy, apply_placement, make_policy
from app.core.presets.schema import Preset
from app.core.spec import EngineSpec

# An engine the preset already has: live and not on its way out. STOPPING is left out:
# its memory and port are released shortly, and a re-apply should start it again.
# STANDBY counts: an on-demand engine of the preset is there, waiting for a request.
ACTIVE_STATES = frozenset(
    {
        EngineState.PENDING,
        EngineState.STARTING,
        EngineState.RUNNING,
        EngineState.UNHEALTHY,
        EngineState.STANDBY,
    }
)

# "standby": an on-demand engine, recorded STANDBY (no room taken now).
Action = Literal["start", "skip", "error", "standby"]


@dataclass(frozen=True)
class PlannedEngine:
    """What applying the preset would do with one engine, and why."""

    name: str
    spec: EngineSpec
    action: Action
    allocation: Allocation | None = None  # action "start"
    running: EngineRecord | None = None  # action "skip": the engine already there
    error: str | None = None  # action "error"
    reasons: tuple[str, ...] = ()

    @property
    def host(self) -> str | None:
        if self.allocation is not None:
            return self.allocation.placement.host
        return self.running.host if self.running is not None else None

    @property
    def gpus(self) -> list[int]:
        if self.allocation is not None:
            return [g.index for g in self.allocation.placement.gpus]
        return [g.index for g in self.running.gpus] if self.running is not None else []

    @property
    def port(self) -> int | None:
        if self.allocation is not None:
            return self.allocation.placement.port
        return self.running.port if self.running is not None else None

    @property
    def memory_per_gpu_mib(self) -> int:
        if self.allocation is not None:
            return self.allocation.placement.memory_mib_per_gpu if self.gpus else 0
        return self.running.memory_per_gpu_mib if self.running is not None else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready row of ``PresetPlan.to_dict``."""
        estimate = None
        launch: dict[str, Any] = {}
        if self.allocation is not None:
            if self.allocation.estimate is not None:
                estimate = self.allocation.estimate.explain()
            launch = dict(self.allocation.launch)
        elif self.running is not None:
            launch = dict(self.running.launch)
        return {
            "name": self.name,
            "model": self.spec.model,
            "kind": self.spec.kind.value,
            "runtime": self.spec.effective_runtime,
            "action": self.action,
            "host": self.host,
            "gpus": self.gpus,
            "port": self.port,
            "memory_per_gpu_gb": mib_to_gb(self.memory_per_gpu_mib) if self.gpus else None,
            "estimate": estimate,
            "launch": launch,
            "engine_id": self.running.id if self.running is not None else None,
            "error": self.error,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class PresetPlan:
    """The dry run of a preset: one ``PlannedEngine`` per engine, in preset order."""

    preset: Preset
    engines: tuple[PlannedEngine, ...]

    @property
    def ok(self) -> bool:
        """True when every engine either fits or already runs."""
        return all(e.action != "error" for e in self.engines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: preset name, ok, and one row per engine."""
        return {
            "preset": self.preset.name,
            "source": self.preset.source,
            "ok": self.ok,
            "engines": [e.to_dict() for e in self.engines],
        }


def _headline(exc: ValidationError | PlacementError) -> str:
    # PlacementError's message is "<headline>:\n  <reason>\n  ..."; reasons go apart.
    if isinstance(exc, PlacementError) and exc.reasons:
        return exc.message.split(":\n  ", 1)[0]
    return exc.message


def _spec_drift(running: EngineSpec, wanted: EngineSpec) -> list[str]:
    a, b = running.to_dict(), wanted.to_dict()
    return sorted(k for k in b if a.get(k) != b[k])


def plan_preset(
    preset: Preset,
    hosts: Sequence[PlacementHost],
    *,
    policy: PlacementPolicy | str,
    margin_mib: int,
    default_max_model_len: int = 32768,
    running: Iterable[EngineRecord] = (),
) -> PresetPlan:
    """Where each engine of ``preset`` would run on ``hosts``; reserves nothing.

    Engines are planned in preset order, each on the hosts as they would be after the
    ones before it are reserved (``apply_placement``), so two engines never count the
    same free memory. An engine of this preset that is already live in ``running``
    (PENDING, STARTING, RUNNING or UNHEALTHY) is skipped. An engine that does not fit
    is recorded with its error and reasons and the plan goes on, so the user sees the
    whole picture; ``ok`` is then False. ``hosts`` is not modified.
    """
    if isinstance(policy, str):
        policy = make_policy(policy)  # an unknown policy fails the request, not one engine
    live: dict[str, EngineRecord] = {}
    for record in running:
        if (
            record.state in ACTIVE_STATES
            and record.spec.preset == preset.name
            and record.spec.preset_engine is not None
        ):
            live.setdefault(record.spec.preset_engine, record)

    current = list(hosts)
    planned: list[PlannedEngine] = []
    for eng in preset.engines:
        rec = live.get(eng.name)
        if rec is not None:
            reasons = [f"engine {rec.id} is {rec.state.value}"]
            drift = _spec_drift(rec.spec, eng.spec)
            if drift:
                reasons.append(
                    f"it was started with a different {', '.join(drift)}; stop it and apply "
                    "again to change it"
                )
            planned.append(
                PlannedEngine(eng.name, eng.spec, "skip", running=rec, reasons=tuple(reasons))
            )
            continue
        if eng.spec.on_demand:
            why = "on demand: recorded STANDBY, started by the first request for it"
            planned.append(PlannedEngine(eng.name, eng.spec, "standby", reasons=(why,)))
            continue
        try:
            alloc = plan(
                eng.spec,
                current,
                policy=policy,
                margin_mib=margin_mib,
                default_max_model_len=default_max_model_len,
            )
        except PlacementError as exc:
            planned.append(
                PlannedEngine(
                    eng.name, eng.spec, "error", error=_headline(exc), reasons=tuple(exc.reasons)
                )
            )
            continue
        except ValidationError as exc:
            planned.append(PlannedEngine(eng.name, eng.spec, "error", error=exc.message))
            continue
        current = apply_placement(current, alloc.placement)
        planned.append(PlannedEngine(eng.name, eng.spec, "start", allocation=alloc))
    return PresetPlan(preset, tuple(planned))
