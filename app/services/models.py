"""The models each host's worker found on its disk (``GET /v1/management/models``),
with their facts and the memory each needs at the default length."""

from __future__ import annotations

from typing import Any

from app.core.errors import ValidationError
from app.core.memory import estimate_on_disk
from app.state.model_facts import hosts_model_facts
from app.state.registry import Registry


def models_on_hosts(registry: Registry, *, default_max_model_len: int) -> list[dict[str, Any]]:
    """Each known host (up or not) with the models its worker found on its disk: their
    facts and what each would need at ``default_max_model_len`` (``estimate_on_disk``;
    ``estimate_error`` when the facts cannot size it)."""
    hosts = sorted(registry.hosts(), key=lambda h: h.name)
    facts = hosts_model_facts(registry.r, [h.name for h in hosts])
    out = []
    for h in hosts:
        models = []
        for key, f in sorted(facts.get(h.name, {}).items()):
            row: dict[str, Any] = {"model": key, "path": f.path, "facts": f}
            try:
                row["estimate"] = estimate_on_disk(f, default_max_model_len=default_max_model_len)
            except ValidationError as exc:
                row["estimate"], row["estimate_error"] = None, exc.message
            models.append(row)
        out.append({"host": h.name, "up": h.up, "models": models})
    return out
