"""What every engine runtime provides: how to launch it and how to tell it is ready.

One module per runtime (``vllm``, ``embedding``, ``transformers``) implements
``Runtime``; ``workers.runtimes.get_runtime(name)`` returns it. Argv is always a list
(never a shell string); the environment always pins GPUs with ``CUDA_VISIBLE_DEVICES``
and tags the process with ``SAGELLM_ENGINE_ID`` (see ``engine_env``).

Engines bind to ``record.address`` (the worker's ``SAGELLM_HOST_ADDRESS``): the API
host's gateway reaches them there from other machines, and an engine is never exposed
on interfaces the operator did not name. That address must belong to a local interface.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.core.engine_policy import (
    DEVICE_ORDER_ENV,
    ENGINE_ID_ENV,
    VISIBLE_DEVICES_ENV,
    EnginePolicy,
    check_spec,
)
from app.core.errors import SagellmError, ValidationError
from app.core.models import EngineRecord
from app.core.runtimes import owned_flags
from app.core.spec import EngineSpec


class RuntimeUnavailable(SagellmError):
    """The runtime cannot start on this host (e.g. its executable is not installed).

    Raised by ``Runtime.build`` and by process spawning; the caller records it as the
    engine's start failure.
    """

    status_code = 503


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


def engine_env(record: EngineRecord) -> dict[str, str]:
    """Environment added on top of the worker's own for ``record``'s process.

    The worker's environment passes through (``HF_HOME``, ``HF_HUB_OFFLINE``,
    proxies...), less the control plane's own variables (``processes.spawn``); then the
    user's ``spec.env`` (the allow-list of ``app.core.engine_policy``); then the keys
    that pin and tag the process, which the user cannot override (the allow-list
    already refuses them, ``app.core.engine_policy.RESERVED_ENV``; they are forced
    here all the same).

    ``CUDA_VISIBLE_DEVICES`` lists GPU UUIDs exactly as NVML reports them
    (``GPU-xxxxxxxx-...``) because NVML's index order is not CUDA's. An engine without
    GPUs gets ``""``, which hides every GPU: it must not touch memory it did not
    reserve.
    """
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}  # log lines reach the log file now
    env.update(record.spec.env)
    env.update(
        {
            ENGINE_ID_ENV: record.id,
            VISIBLE_DEVICES_ENV: ",".join(g.uuid for g in record.gpus),
            DEVICE_ORDER_ENV: "PCI_BUS_ID",
        }
    )
    return env


def bind_address(record: EngineRecord) -> str:
    """The address ``record``'s engine listens on: ``record.address``."""
    if not record.address:
        raise ValidationError(f"engine {record.id} has no address: not placed", field="address")
    return record.address


def bind_port(record: EngineRecord) -> int:
    """The port reserved for ``record``'s engine."""
    if record.port is None:
        raise ValidationError(f"engine {record.id} has no port: not placed", field="port")
    return record.port


def flag_name(arg: str, *, underscores_are_dashes: bool = False) -> str | None:
    """``"--max-model-len"`` for ``"--max-model-len"`` or ``"--max-model-len=8"``; None
    for a value or positional argument."""
    if not arg.startswith("-") or arg == "-" or arg == "--":
        return None
    name = arg.split("=", 1)[0]
    if underscores_are_dashes and name.startswith("--"):
        name = "--" + name[2:].replace("_", "-")
    return name


def user_flags(extra_args: Iterable[str], *, underscores_are_dashes: bool = False) -> set[str]:
    """The flag names present in ``extra_args``."""
    out = set()
    for arg in extra_args:
        name = flag_name(arg, underscores_are_dashes=underscores_are_dashes)
        if name is not None:
            out.add(name)
    return out


def probe_openai(
    record: EngineRecord, client: httpx.Client, timeout_s: float, *, check_models: bool = True
) -> Readiness:
    """Ready when ``GET /health`` is 200 and (``check_models``) ``GET /v1/models`` lists
    the served name. Never raises for an engine that is not ready; says why instead."""
    base = record.base_url
    if base is None:
        return Readiness(False, "engine has no address or port yet")
    try:
        health = client.get(f"{base}/health", timeout=timeout_s)
    except httpx.ConnectError:
        return Readiness(False, "not listening yet")
    except httpx.TimeoutException:
        return Readiness(False, f"/health did not answer within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return Readiness(False, f"/health: {type(exc).__name__}: {exc}")
    if health.status_code != 200:
        return Readiness(False, f"/health answered {health.status_code}")
    if not check_models:
        return Readiness(True)
    served = record.spec.name
    try:
        resp = client.get(f"{base}/v1/models", timeout=timeout_s)
    except httpx.TimeoutException:
        return Readiness(False, f"/v1/models did not answer within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return Readiness(False, f"/v1/models: {type(exc).__name__}: {exc}")
    if resp.status_code != 200:
        return Readiness(False, f"/v1/models answered {resp.status_code}")
    try:
        body = resp.json()
        ids = [str(m.get("id")) for m in body.get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError):
        return Readiness(False, "/v1/models did not answer an OpenAI model list")
    if served not in ids:
        return Readiness(False, f"/v1/models does not list {served!r} (lists {ids})")
    return Readiness(True, extra={"models": ids})


class Runtime:
    """Base class; subclasses set ``name`` and implement ``argv``.

    ``build`` = ``validate`` + ``argv`` + ``engine_env``; ``probe`` = ``probe_openai``.
    ``validate`` applies ``app.core.engine_policy`` with this runtime's ``owned_flags``;
    it runs at the API edge (``app.services.admission``, before anything is reserved) and
    again in ``build`` on the worker.
    """

    name = ""

    @property
    def owned_flags(self) -> Mapping[str, str]:
        """The flags argv sets itself, each mapped to the spec field to use instead:
        ``app.core.runtimes.OWNED_FLAGS`` (so the API checks them without this package)."""
        return owned_flags(self.name)

    def validate(self, spec: EngineSpec, policy: EnginePolicy | None = None) -> None:
        """Raise ``ValidationError`` if this runtime may not run ``spec``: the engine
        policy (env, flags; model roots and unsafe flags when ``policy`` is given)."""
        check_spec(spec, policy, self.owned_flags)

    def argv(self, record: EngineRecord) -> list[str]:
        """The command line for ``record`` (placed: address, port and GPUs are set)."""
        raise NotImplementedError

    def build(self, record: EngineRecord, policy: EnginePolicy | None = None) -> LaunchPlan:
        """Argv and environment for ``record`` (placed: host, port and GPUs are set),
        after ``validate`` (defence in depth: the edge checked it already)."""
        self.validate(record.spec, policy)
        return LaunchPlan(argv=self.argv(record), env=engine_env(record))

    def probe(self, record: EngineRecord, client: httpx.Client, timeout_s: float) -> Readiness:
        """Ready means: ``GET /health`` is 200 and, for LLM runtimes, ``GET /v1/models``
        lists the served name."""
        return probe_openai(record, client, timeout_s)


# The directory holding the ``workers`` package, so ``python -m workers.servers.X``
# imports this very checkout whatever the worker's cwd and whether or not it is installed.
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


class ServerModuleRuntime(Runtime):
    """One of the project's own OpenAI servers, run as ``python -m <module>`` with the
    worker's interpreter: ``--model --host --port --served-model-name --device``, then
    ``spec.extra_args`` verbatim. The flags we set are placement's, so ``extra_args``
    may not repeat them."""

    module = ""

    def argv(self, record: EngineRecord) -> list[str]:
        """``python -m <module> ...`` for ``record``."""
        spec = record.spec
        return [
            sys.executable,
            "-m",
            self.module,
            "--model",
            spec.model,
            "--host",
            bind_address(record),
            "--port",
            str(bind_port(record)),
            "--served-model-name",
            spec.name,
            # cuda only on reserved GPUs: with none, CUDA_VISIBLE_DEVICES="" hides them all
            "--device",
            "cuda" if record.gpus else "cpu",
            *spec.extra_args,
        ]

    def build(self, record: EngineRecord, policy: EnginePolicy | None = None) -> LaunchPlan:
        """``argv`` and ``engine_env``, with this checkout first on ``PYTHONPATH``."""
        plan = super().build(record, policy)
        inherited = os.environ.get("PYTHONPATH", "")  # a spec may not set PYTHONPATH
        pythonpath = os.pathsep.join(p for p in (_PROJECT_ROOT, inherited) if p)
        return LaunchPlan(argv=plan.argv, env={**plan.env, "PYTHONPATH": pythonpath})
