"""Admission: every check a spec must pass before anything is reserved or queued.

Called at the edge (a direct start, a restart, each engine of a preset); the worker's
runtime applies the same engine policy again when it builds the argv.
"""

from __future__ import annotations

from app.core.engine_policy import check_spec
from app.core.runtimes import owned_flags
from app.core.spec import EngineSpec
from app.settings import Settings


def admit(settings: Settings, spec: EngineSpec) -> EngineSpec:
    """Every check a spec must pass before anything is reserved or queued: the spec's own
    validation, the engine policy (env, flags, model roots, unsafe flags per settings) and
    the runtime's argv check with the flags that runtime owns. ValidationError naming the
    field. Returns the validated spec."""
    spec = spec.validate()
    check_spec(spec, settings.engine_policy(), owned_flags(spec.effective_runtime))
    return spec
