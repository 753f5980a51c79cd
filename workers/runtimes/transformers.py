"""The project's own Hugging Face transformers chat server (``workers.servers.transformers``).

For LLMs where vLLM is not installed or not wanted (CPU hosts, tests).
"""

from __future__ import annotations

from workers.runtimes.base import ServerModuleRuntime


class TransformersRuntime(ServerModuleRuntime):
    """``python -m workers.servers.transformers``; ready when /health is 200 and
    /v1/models lists the served name."""

    name = "transformers"
    module = "workers.servers.transformers"
