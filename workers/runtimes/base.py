"""What every engine runtime provides: how to launch it and how to tell it is ready.

One module per runtime (``vllm``, ``embedding``, ``transformers``) implements
``Runtime``; ``workers.runtimes.get_runtime(name)`` returns it. Argv is always a list
(never a shell string); the environment always pins GPUs with ``CUDA_VISIBLE_DEVICES``
and tags the process with ``SAGELLM_ENGINE_ID``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.core.models import EngineRecord

ENGINE_ID_ENV = "SAGELLM_ENGINE_ID"


@dataclass(frozen=True)
class LaunchPlan:
    """How to start one engine process."""

    argv: list[str]
    env: dict[str, str]  # added to the worker's environment (overrides it)
    cwd: Path | None = None


@dataclass(frozen=True)
class Readiness:
    ready: bool
    detail: str = ""  # why not ready, in words (e.g. "/v1/models does not list 'qwen'")
    extra: dict[str, object] = field(default_factory=dict)


class Runtime:
    """Base class; subclasses set ``name`` and implement ``argv``."""

    name = ""

    def build(self, record: EngineRecord) -> LaunchPlan:
        """Argv and environment for ``record`` (placed: host, port and GPUs are set)."""
        raise NotImplementedError

    def probe(self, record: EngineRecord, client: httpx.Client, timeout_s: float) -> Readiness:
        """Ready means: ``GET /health`` is 200 and, for LLM runtimes, ``GET /v1/models``
        lists the served name."""
        raise NotImplementedError
