"""The model fixtures of tests/fixtures/models/: the published config.json of three
models (no weights), shared by the memory-estimate, model-facts, allocation,
remediation and worker tests."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"
QWEN_1_5B = FIXTURES / "Qwen2.5-1.5B-Instruct"
LLAMA_8B = FIXTURES / "Llama-3.1-8B-Instruct"
QWEN_7B_AWQ = FIXTURES / "Qwen2.5-7B-Instruct-AWQ"
