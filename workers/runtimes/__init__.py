"""Engine runtimes, registered by name: how to launch each kind of engine and how to
tell it is ready. ``get_runtime(name)``; an unknown name is an error, never a fallback.
"""

from __future__ import annotations

from app.core.errors import ValidationError
from workers.runtimes.base import LaunchPlan, Readiness, Runtime, RuntimeUnavailable, engine_env
from workers.runtimes.embedding import EmbeddingRuntime
from workers.runtimes.transformers import TransformersRuntime
from workers.runtimes.vllm import VllmRuntime

RUNTIMES: dict[str, Runtime] = {
    r.name: r for r in (VllmRuntime(), EmbeddingRuntime(), TransformersRuntime())
}


def get_runtime(name: str) -> Runtime:
    """The runtime registered as ``name``; ``ValidationError(field="runtime")`` if none."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ValidationError(
            f"runtime: {name!r} is not a known runtime; known: {', '.join(sorted(RUNTIMES))}",
            field="runtime",
        ) from None


__all__ = [
    "RUNTIMES",
    "LaunchPlan",
    "Readiness",
    "Runtime",
    "RuntimeUnavailable",
    "engine_env",
    "get_runtime",
]
