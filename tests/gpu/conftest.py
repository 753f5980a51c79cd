"""Tests under tests/gpu need NVML and at least one NVIDIA GPU; without them they skip.

The check runs once per session, in an autouse fixture of this directory, so a
machine with no GPU reports every test here as skipped with the reason instead of
failing.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest


@functools.cache
def nvml_skip_reason() -> str | None:
    """Why NVML can't be used here, or None when it sees at least one GPU."""
    try:
        import pynvml
    except ImportError as exc:
        return f"nvidia-ml-py is not installed: {exc}"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"NVML cannot initialise: {exc}"
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        return f"NVML cannot count devices: {exc}"
    finally:
        pynvml.nvmlShutdown()
    return None if count > 0 else "NVML reports 0 GPUs"


@functools.cache
def torch_cuda_skip_reason() -> str | None:
    """Why a child Python can't use CUDA through torch, or None when it can.

    Asked of a subprocess, not imported here: initialising CUDA in the test process
    would put the test runner itself on the GPU's process list.
    """
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "importing torch and probing CUDA took over 120 s"
    if done.returncode == 3:
        return "torch is installed but torch.cuda.is_available() is False"
    if done.returncode != 0:
        return f"torch is not importable: {done.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(autouse=True)
def _needs_nvml_gpu() -> None:
    """Skip every test in this directory when NVML sees no GPU."""
    reason = nvml_skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def torch_cuda() -> None:
    """Skip a test that runs torch in a child process when torch can't use CUDA."""
    reason = torch_cuda_skip_reason()
    if reason is not None:
        pytest.skip(reason)
