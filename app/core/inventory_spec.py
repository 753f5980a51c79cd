"""Parse a mock GPU inventory spec (``SAGELLM_MOCK_GPUS``).

Forms accepted:

* ``"2x80"``: two GPUs of 80 GB; ``"2x80,1x24"`` or ``"80,24"``: a list of groups.
* JSON: ``[{"total_gb": 80, "outside_gb": 10, "name": "A100"}, ...]`` — ``outside_gb``
  is memory held by processes that are not ours, as NVML would show it.
* ``"none"`` or ``"0"``: a host with no GPUs.

Mock UUIDs are derived from the host name and index, so they are stable across
restarts (re-adoption matches engines to GPUs by UUID).
"""

from __future__ import annotations

import json
import re
import uuid as uuidlib
from typing import Any

from app.core.errors import ConfigError
from app.core.gpus import GpuInfo, gb_to_mib

_VAR = "SAGELLM_MOCK_GPUS"
_GROUP = re.compile(r"^\s*(?:(\d+)\s*[xX]\s*)?(\d+(?:\.\d+)?)\s*$")
_NS = uuidlib.UUID("6f3d2a1e-9a56-4a55-8c1e-5a6e1f0c0b7d")


def mock_uuid(host: str, index: int) -> str:
    return "GPU-" + str(uuidlib.uuid5(_NS, f"{host}/{index}"))


def _bad(raw: str, why: str) -> ConfigError:
    return ConfigError(
        f'{_VAR}={raw!r}: {why}. Expected e.g. "2x80", "80,24", "none" or JSON '
        '[{"total_gb": 80, "outside_gb": 10}]',
        field=_VAR,
    )


def parse_mock_gpus(raw: str, host: str) -> list[GpuInfo]:
    """Return the mock GPUs of ``host`` described by ``raw``; ``ConfigError`` if malformed."""
    text = raw.strip()
    if text.lower() in ("", "none", "0"):
        return []
    specs: list[dict[str, Any]] = []
    if text.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _bad(raw, f"invalid JSON ({exc.msg})") from None
        if isinstance(data, dict):
            data = data.get("gpus")
        if not isinstance(data, list):
            raise _bad(raw, "JSON must be a list of GPUs")
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise _bad(raw, f"GPU {i} must be an object")
            unknown = set(item) - {"total_gb", "outside_gb", "name", "utilization_pct"}
            if unknown:
                raise _bad(raw, f"GPU {i}: unknown field {sorted(unknown)[0]!r}")
            specs.append(item)
    else:
        for part in text.split(","):
            m = _GROUP.match(part)
            if not m:
                raise _bad(raw, f"cannot read {part.strip()!r}")
            count = int(m.group(1) or 1)
            if count < 1 or count > 64:
                raise _bad(raw, f"count in {part.strip()!r} must be 1..64")
            specs.extend({"total_gb": float(m.group(2))} for _ in range(count))
    gpus = []
    for i, item in enumerate(specs):
        total, outside = item.get("total_gb"), item.get("outside_gb", 0)
        for name, value in (("total_gb", total), ("outside_gb", outside)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _bad(raw, f"GPU {i}: {name} must be a number")
        assert isinstance(total, int | float) and isinstance(outside, int | float)
        if not 0 < total <= 4096:
            raise _bad(raw, f"GPU {i}: total_gb must be in (0, 4096]")
        if not 0 <= outside <= total:
            raise _bad(raw, f"GPU {i}: outside_gb must be between 0 and total_gb")
        util = item.get("utilization_pct", 0)
        if isinstance(util, bool) or not isinstance(util, int) or not 0 <= util <= 100:
            raise _bad(raw, f"GPU {i}: utilization_pct must be an integer 0..100")
        total_mib, outside_mib = gb_to_mib(total), gb_to_mib(outside)
        gpus.append(
            GpuInfo(
                index=i,
                uuid=mock_uuid(host, i),
                name=str(item.get("name", f"Mock GPU {total:g}GB")),
                total_mib=total_mib,
                free_mib=total_mib - outside_mib,
                utilization_pct=util,
            )
        )
    return gpus
