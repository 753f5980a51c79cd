"""What a management caller may make an engine do: the one allow-list.

A caller of ``/v1/management`` chooses an engine's model, ``extra_args`` and ``env``,
and the engine runs as the worker's user on a shared GPU host. This module decides
which of those choices pass:

* ``env``: only names on an allow-list (exact names, and a few prefixes), never a name
  that names a path, a cache, a plugin or a module (``*_PATH``, ``*_DIR``, ``*_HOME``,
  ``*PLUGIN*``...), since those load code or files; values without NUL or newline.
  The worker's own environment still passes through to engines (minus the control
  plane's variables, see ``workers.host.processes.spawn``): an operator sets the rest there.
* ``extra_args``: no flag the runtime sets itself (``owned``, from the runtime: one
  owner), in any spelling argparse accepts (``--po``, ``--port=1``, ``--tensor_p``,
  ``-tp8``); no ``--config`` (a YAML of more flags, past these checks); no lone ``--``
  (what follows would become positionals: the model); flags that run code from the model
  repository or read files on the host only when the operator lists them in
  ``SAGELLM_ENGINE_UNSAFE_FLAGS``; path-valued flags (``--tokenizer``...) under the
  model roots.
* ``model``: a local path must resolve (symlinks and ``..`` followed) under one of the
  model roots; a Hugging Face repo id is not a path.

Pure: the policy is plain data built from the settings at the edge
(``Settings.engine_policy``) and passed in. Every refusal is a ``ValidationError``
naming the field and the reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from app.core.errors import ConfigError, ValidationError
from app.core.memory.facts import is_path_like

# ---------------------------------------------------------------------------- env

# The variables sagellm sets on every engine process, here and nowhere else: a spec may
# not set them (``RESERVED_ENV``), ``workers.runtimes`` sets them, and the worker finds
# its engines by them.
ENGINE_ID_ENV = "SAGELLM_ENGINE_ID"
# Several workers on one machine (simulated hosts, tests) each adopt only their own
# host's processes...
ENGINE_HOST_ENV = "SAGELLM_ENGINE_HOST"
# ...and only the processes of their own directory (manifests, logs): two clusters on
# one machine with the same host name (two users' `make up`) never touch each other's.
ENGINE_OWNER_ENV = "SAGELLM_ENGINE_OWNER"
VISIBLE_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
DEVICE_ORDER_ENV = "CUDA_DEVICE_ORDER"
RESERVED_ENV = {
    ENGINE_ID_ENV: "sagellm sets it: it tags the process as this engine's",
    ENGINE_HOST_ENV: "sagellm sets it: it tags the process as this host worker's",
    ENGINE_OWNER_ENV: "sagellm sets it: it tags the process as this worker directory's",
    VISIBLE_DEVICES_ENV: "placement sets it to the reserved GPUs; use gpu_ids",
    DEVICE_ORDER_ENV: f"sagellm sets it with {VISIBLE_DEVICES_ENV} (PCI bus order)",
}

ENV_ALLOWED_NAMES = frozenset(
    {
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "TOKENIZERS_PARALLELISM",
        "TRANSFORMERS_OFFLINE",
        "TRANSFORMERS_VERBOSITY",
        "HF_HUB_OFFLINE",
        "CUDA_DEVICE_MAX_CONNECTIONS",
        "CUDA_LAUNCH_BLOCKING",
        "PYTORCH_CUDA_ALLOC_CONF",
        "PYTHONUNBUFFERED",
    }
)
# Each still subject to ENV_PATH_WORDS and ENV_DENIED.
ENV_ALLOWED_PREFIXES = ("HF_", "VLLM_", "NCCL_", "TORCH_")
# A name with one of these words (split at "_") names a path, a cache, a library or
# code to load: refused even under an allowed prefix. HF_HOME and HF_HUB_CACHE are
# among them: a cache elsewhere would load a repo id's weights from outside the roots.
ENV_PATH_WORDS = frozenset(
    {"PATH", "DIR", "DIRS", "FILE", "FILES", "HOME", "CACHE", "ROOT", "MODULE", "MODULES"}
    | {"SO", "LIB", "LIBS", "PLUGINS"}
)
# Allowed prefix, harmless-looking name, not harmless.
ENV_DENIED = {
    **RESERVED_ENV,
    "VLLM_PORT": "it moves vLLM's internal ports off the ones sagellm reserved",
    "VLLM_HOST_IP": "it moves vLLM's internal traffic off the address sagellm placed it on",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "it lets API callers load adapters from host paths",
    "VLLM_SERVER_DEV_MODE": "it opens vLLM's development endpoints",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "it unpickles data, which can run code",
}


_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def env_refusal(name: str) -> str | None:
    """Why ``name`` may not be set in a spec's ``env``; None when it may."""
    if not _ENV_NAME_RE.match(name):
        return "a variable name is upper-case letters, digits and _"
    words = name.split("_")
    if any(w in ENV_PATH_WORDS or "PLUGIN" in w for w in words):
        return (
            "it names a path, a cache, a library or a plugin (code or files on the host); "
            "an operator sets such variables in the worker's environment"
        )
    if name in ENV_DENIED:
        return ENV_DENIED[name]
    if name in ENV_ALLOWED_NAMES or name.startswith(ENV_ALLOWED_PREFIXES):
        return None
    return (
        "only these names are: "
        + ", ".join(sorted(ENV_ALLOWED_NAMES))
        + ", and names starting "
        + ", ".join(ENV_ALLOWED_PREFIXES)
        + " (the worker's own environment passes through to engines)"
    )


def check_env(env: Mapping[str, str]) -> None:
    """Raise ``ValidationError(field="env")`` naming the first variable refused."""
    for name, value in env.items():
        reason = env_refusal(name)
        if reason is not None:
            raise ValidationError(f"env: {name!r} is not allowed: {reason}", field="env")
        if any(c in value for c in "\x00\n\r"):
            raise ValidationError(
                f"env: {name!r}: the value may not contain NUL or a line break", field="env"
            )


# ---------------------------------------------------------------------------- flags

# Flags that run code or read files on the host: refused unless the operator lists
# them in SAGELLM_ENGINE_UNSAFE_FLAGS. --chat-template only when its value is a path.
UNSAFE_FLAGS = {
    "--trust-remote-code": "it runs code from the model repository",
    "--chat-template": "given a file (not inline template text), it reads that file on the host",
    "--allowed-local-media-path": "requests may then make the engine read files on the host",
    "--lora-modules": "it reads adapter files from host paths",
    "--worker-cls": "it imports and runs the Python class it names",
    "--worker-extension-cls": "it imports and runs the Python class it names",
    "--middleware": "it imports and runs the Python object it names",
    "--logits-processors": "it imports and runs the Python classes it names",
    "--tool-parser-plugin": "it runs a Python file from the host",
    "--kv-transfer-config": "it can name a Python module to import",
    "--ssl-keyfile": "it reads a file on the host",
    "--ssl-certfile": "it reads a file on the host",
    "--ssl-ca-certs": "it reads a file on the host",
}
# Flags whose value, when a local path, must be under the model roots (a repo id passes).
PATH_FLAGS = ("--tokenizer", "--download-dir", "--hf-config-path")
# Refused whatever the settings say.
FORBIDDEN_FLAGS = {
    "--config": "vLLM reads more flags from that file, past every check here; "
    "pass the flags themselves",
}
# Inline chat templates are Jinja; vLLM reads a value without Jinja markers as a file.
_JINJA_MARKERS = ("{{", "{%")


def _flag_name(token: str) -> str | None:
    """The option ``token`` names, normalised (``--tensor_p=4`` -> ``--tensor-p``);
    None for a value or positional (``-1``, ``x``)."""
    if not token.startswith("-") or token in ("-", "--") or token[1:2].isdigit():
        return None
    name = token.split("=", 1)[0]
    if name.startswith("--"):
        # vLLM reads --flag_name as --flag-name, and --flag.key=v as a key of --flag.
        name = "--" + name[2:].replace("_", "-").split(".", 1)[0]
    return name


def _matches(name: str, flag: str) -> bool:
    """Whether argparse (``allow_abbrev``) may read option ``name`` as ``flag``: a
    prefix of it; for short flags also ``-tp8`` (value attached)."""
    if flag.startswith("--"):
        return name.startswith("--") and len(name) > 2 and flag.startswith(name)
    if name.startswith("--"):
        return False
    return flag.startswith(name) or name.startswith(flag)


def _value_after(args: Sequence[str], i: int) -> str | None:
    token = args[i]
    if "=" in token:
        return token.split("=", 1)[1]
    return args[i + 1] if i + 1 < len(args) else None


def check_args(
    extra_args: Sequence[str],
    owned: Mapping[str, str],
    policy: EnginePolicy | None,
) -> None:
    """Raise ``ValidationError(field="extra_args")`` for the first token refused.

    ``owned`` maps each flag the runtime sets to the spec field to use instead. Without
    a ``policy`` (the worker, when not given its settings) the checks that need settings
    (unsafe flags, roots) are skipped; the rest always run.
    """
    for i, token in enumerate(extra_args):
        if "\x00" in token:
            raise ValidationError(
                f"extra_args: {token!r} contains NUL, which no argument can carry",
                field="extra_args",
            )
        if token == "--":
            raise ValidationError(
                "extra_args: a lone '--' is not allowed: it ends option parsing, so what "
                "follows would become positional arguments (the model)",
                field="extra_args",
            )
        name = _flag_name(token)
        if name is None:
            continue
        for flag, use in owned.items():
            if _matches(name, flag):
                raise ValidationError(
                    f"extra_args: {token!r} sets {flag}, which sagellm sets; use {use} instead",
                    field="extra_args",
                )
        for flag, reason in FORBIDDEN_FLAGS.items():
            if _matches(name, flag):
                raise ValidationError(
                    f"extra_args: {_shown(token, flag)} is not allowed: {reason}",
                    field="extra_args",
                )
        if policy is None:
            continue
        for flag, reason in UNSAFE_FLAGS.items():
            if not _matches(name, flag) or flag in policy.unsafe_flags:
                continue
            value = _value_after(extra_args, i)
            if flag == "--chat-template" and value is not None and _inline_template(value):
                continue
            raise ValidationError(
                f"extra_args: {_shown(token, flag)} is not allowed: {reason}; an operator "
                f"can allow it with SAGELLM_ENGINE_UNSAFE_FLAGS={flag}",
                field="extra_args",
            )
        for flag in PATH_FLAGS:
            if not _matches(name, flag) or flag in policy.unsafe_flags:
                continue
            value = _value_after(extra_args, i)
            if value is not None and is_local_path(value) and not policy.under_roots(value):
                raise ValidationError(
                    f"extra_args: {flag} {value!r} is outside the allowed model roots "
                    f"({policy.describe_roots()})",
                    field="extra_args",
                )


def _shown(token: str, flag: str) -> str:
    """``'--trust-remote' (--trust-remote-code)``: the token, and the flag it means."""
    return repr(token) if token.split("=", 1)[0] == flag else f"{token!r} ({flag})"


def _inline_template(value: str) -> bool:
    return any(m in value for m in _JINJA_MARKERS)


# ---------------------------------------------------------------------------- models


def is_local_path(model: str) -> bool:
    """Whether vLLM and transformers would read ``model`` as a local path rather than a
    Hugging Face repo id (``name`` or ``org/name``)."""
    # a relative directory that exists is read as one
    return is_path_like(model) or os.path.isdir(model)


@dataclass(frozen=True)
class EnginePolicy:
    """What the allow-lists need from the settings: model roots and unsafe flags."""

    model_roots: tuple[str, ...]
    unsafe_flags: frozenset[str] = frozenset()

    @classmethod
    def build(cls, model_roots: Iterable[str], unsafe_flags: Iterable[str]) -> EnginePolicy:
        """The policy for these roots and the operator's ``SAGELLM_ENGINE_UNSAFE_FLAGS``;
        ``ConfigError`` for a name that is not an unsafe flag this module knows (a typo,
        or an owned flag such as ``--port``)."""
        unsafe = frozenset(_normalise(f) for f in unsafe_flags)
        known = set(UNSAFE_FLAGS) | set(PATH_FLAGS)
        unknown = sorted(unsafe - known)
        if unknown:
            raise ConfigError(
                f"SAGELLM_ENGINE_UNSAFE_FLAGS: {unknown[0]!r} is not an engine flag that can "
                f"be allowed; known: {', '.join(sorted(known))}",
                field="SAGELLM_ENGINE_UNSAFE_FLAGS",
            )
        return cls(model_roots=tuple(model_roots), unsafe_flags=unsafe)

    def under_roots(self, path: str) -> bool:
        """Whether ``path`` resolves (symlinks, ``..`` and ``~`` followed) under a root."""
        real = os.path.realpath(os.path.expanduser(path))
        for root in self.model_roots:
            top = os.path.realpath(os.path.expanduser(root))
            if os.path.commonpath([real, top]) == top:
                return True
        return False

    def describe_roots(self) -> str:
        if not self.model_roots:
            return "none"
        return ", ".join(self.model_roots) + "; SAGELLM_MODEL_ROOTS sets them"


def _normalise(flag: str) -> str:
    flag = flag.strip()
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def check_model(model: str, policy: EnginePolicy) -> None:
    """Raise ``ValidationError(field="model")`` for a local path outside the roots."""
    if is_local_path(model) and not policy.under_roots(model):
        raise ValidationError(
            f"model: {model!r} is outside the allowed model roots ({policy.describe_roots()})",
            field="model",
        )


# ---------------------------------------------------------------------------- spec


class EngineSpecLike(Protocol):
    """The fields of ``EngineSpec`` this module reads (no import cycle with models)."""

    @property
    def model(self) -> str: ...
    @property
    def extra_args(self) -> Sequence[str]: ...
    @property
    def env(self) -> Mapping[str, str]: ...


def check_spec(spec: EngineSpecLike, policy: EnginePolicy | None, owned: Mapping[str, str]) -> None:
    """Every rule of this module for ``spec``; ``owned`` = the runtime's own flags.

    Called at the edge (``app.services.admission``: start, restart, preset apply) with the policy
    from the settings, and by the worker's runtime when it builds the argv.
    """
    check_env(spec.env)
    if policy is not None:
        check_model(spec.model, policy)
    check_args(spec.extra_args, owned, policy)
