"""The project's own embedding server (``workers.servers.embedding``)."""

from __future__ import annotations

from workers.runtimes.base import ServerModuleRuntime


class EmbeddingRuntime(ServerModuleRuntime):
    """``python -m workers.servers.embedding``; ready when /health is 200 and
    /v1/models lists the served name."""

    name = "embedding"
    module = "workers.servers.embedding"
