"""vLLM's OpenAI server (``vllm serve``): the one module that builds vLLM's argv.

Flags sagellm sets, and who wins when ``spec.extra_args`` names them too:

* Owned by placement (``app.core.runtimes.VLLM_OWNED_FLAGS``), refused in
  ``extra_args`` in any spelling argparse accepts (``--po``, ``--port=1``,
  ``--tensor_p``, ``-tp8``; the rule is ``app.core.engine_policy``'s, which also
  refuses ``--config``, a lone ``--`` and unsafe flags): ``--host``, ``--port``,
  ``--tensor-parallel-size``/``-tp``, ``--pipeline-parallel-size``/``-pp``,
  ``--served-model-name``, ``--model``. Another value would listen on a port the
  ledger never reserved, use GPUs never reserved, or make readiness look for the wrong
  name; the spec has a field for each.
* Tunables, the user's value wins and ours is dropped: ``--gpu-memory-utilization``
  and ``--max-model-len`` (from ``record.launch``, which the memory estimate derived
  from the reservation), ``--dtype``, ``--quantization``/``-q``. Either ``--flag value``
  or ``--flag=value`` (and vLLM's ``--flag_name`` spelling) counts. A user
  ``--gpu-memory-utilization`` above what was reserved can use memory the ledger
  does not know of: that is the user's explicit choice.

Everything else in ``extra_args`` is appended verbatim, after our flags.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from app.core.models import EngineRecord
from workers.runtimes.base import (
    Runtime,
    RuntimeUnavailable,
    bind_address,
    bind_port,
    user_flags,
)

EXECUTABLE = "vllm"

# Short aliases vLLM accepts for the tunables, mapped to the long flag we emit.
_ALIASES = {"-q": "--quantization"}


def find_vllm(path: str | None = None) -> str:
    """Absolute path of the ``vllm`` executable: on ``path`` (default: ``$PATH``), else
    next to this interpreter (a worker started as ``.venv/bin/celery`` without its venv
    on ``PATH`` still finds the venv's vLLM). ``RuntimeUnavailable`` if neither has it.
    """
    found = shutil.which(EXECUTABLE, path=path)
    if found:
        return found
    beside = Path(sys.executable).parent / EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise RuntimeUnavailable(
        f"runtime vllm: executable {EXECUTABLE!r} not found on PATH "
        f"({path if path is not None else os.environ.get('PATH', '')}) or in "
        f"{beside.parent}; install vLLM on this host (pip install 'sagellm[vllm]')"
    )


def _format_utilization(value: Any) -> str:
    # Three decimals of a fraction, as app.core.memory.fit.vllm_fit_flags rounds down.
    return f"{float(value):.3f}"


class VllmRuntime(Runtime):
    """``vllm serve MODEL`` pinned to the record's GPUs, sized by ``record.launch``."""

    name = "vllm"

    def argv(self, record: EngineRecord) -> list[str]:
        """``vllm serve`` argv; the executable is resolved now, on the worker's PATH (a
        spec may not set PATH)."""
        spec = record.spec
        argv = [
            find_vllm(),
            "serve",
            spec.model,
            "--host",
            bind_address(record),
            "--port",
            str(bind_port(record)),
            "--tensor-parallel-size",
            str(spec.tensor_parallel),
            "--pipeline-parallel-size",
            str(spec.pipeline_parallel),
            "--served-model-name",
            spec.name,
        ]
        tunables: list[tuple[str, str]] = []
        if record.launch.get("gpu_memory_utilization") is not None:
            utilization = _format_utilization(record.launch["gpu_memory_utilization"])
            tunables.append(("--gpu-memory-utilization", utilization))
        if record.launch.get("max_model_len") is not None:
            tunables.append(("--max-model-len", str(int(record.launch["max_model_len"]))))
        if spec.dtype != "auto":
            tunables.append(("--dtype", spec.dtype))
        if spec.quantization:
            tunables.append(("--quantization", spec.quantization))
        given = {
            _ALIASES.get(f, f) for f in user_flags(spec.extra_args, underscores_are_dashes=True)
        }
        for flag, value in tunables:
            if flag not in given:  # the user's value wins
                argv += [flag, value]
        argv += list(spec.extra_args)
        return argv
