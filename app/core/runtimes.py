"""The kinds of engine and the runtimes that serve them, as plain data.

One owner for: which runtimes exist, which kinds each may serve, the default runtime of
a kind, and the flags each runtime sets on its command line itself (``owned_flags``:
refused in ``extra_args``; ``app.core.engine_policy`` applies them). The code that
launches a runtime lives in ``workers.runtimes``, which reads its flags from here, so
the API checks a spec without importing the workers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from app.core.errors import ValidationError


class EngineKind(enum.StrEnum):
    LLM = "llm"
    EMBEDDING = "embedding"


DEFAULT_RUNTIME = {EngineKind.LLM: "vllm", EngineKind.EMBEDDING: "embedding"}
RUNTIMES_BY_KIND = {
    EngineKind.LLM: ("vllm", "transformers"),
    EngineKind.EMBEDDING: ("embedding",),
}

# Each flag the runtime's argv sets, mapped to the spec field to use instead. A user
# --port would listen on a port the ledger never reserved and readiness would probe the
# wrong one; --tensor-parallel-size would use GPUs never reserved.
VLLM_OWNED_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "--host": "the worker's SAGELLM_HOST_ADDRESS",
        "--port": "port",
        "--tensor-parallel-size": "tensor_parallel",
        "-tp": "tensor_parallel",
        "--pipeline-parallel-size": "pipeline_parallel",
        "-pp": "pipeline_parallel",
        "--served-model-name": "served_model_name",
        "--model": "model",
    }
)
# The project's own servers (``python -m workers.servers.X``).
SERVER_MODULE_OWNED_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "--model": "model",
        "--host": "the worker's SAGELLM_HOST_ADDRESS",
        "--port": "port",
        "--served-model-name": "served_model_name",
        "--device": "use_gpu (cuda when GPUs are reserved, else cpu)",
    }
)
OWNED_FLAGS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "vllm": VLLM_OWNED_FLAGS,
        "transformers": SERVER_MODULE_OWNED_FLAGS,
        "embedding": SERVER_MODULE_OWNED_FLAGS,
    }
)
RUNTIME_NAMES: tuple[str, ...] = tuple(OWNED_FLAGS)


def owned_flags(runtime: str) -> Mapping[str, str]:
    """The flags ``runtime`` sets itself; ``ValidationError(field="runtime")`` if unknown."""
    try:
        return OWNED_FLAGS[runtime]
    except KeyError:
        raise ValidationError(
            f"runtime: {runtime!r} is not a known runtime; known: {', '.join(sorted(OWNED_FLAGS))}",
            field="runtime",
        ) from None
