"""Admission: every check a spec must pass before anything is reserved or queued.

Called at the edge (a direct start, a restart, each engine of a preset); the worker's
runtime applies the same engine policy again when it builds the argv.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from app.core.engine_policy import check_spec
from app.core.errors import ValidationError
from app.core.memory import ModelFacts, find_facts, is_path_like
from app.core.runtimes import EngineKind, owned_flags
from app.core.spec import EngineSpec
from app.settings import Settings
from app.state.model_facts import hosts_model_facts
from app.state.registry import Registry


def admit(settings: Settings, spec: EngineSpec, registry: Registry | None = None) -> EngineSpec:
    """Every check a spec must pass before anything is reserved or queued: the spec's own
    validation, the engine policy (env, flags, model roots, unsafe flags per settings),
    the runtime's argv check with the flags that runtime owns, and, given the
    ``registry``, that a local model path exists on some host (``check_model_on_hosts``).
    ValidationError naming the field. Returns the validated spec."""
    spec = spec.validate()
    check_spec(spec, settings.engine_policy(), owned_flags(spec.effective_runtime))
    if registry is not None:
        up = [h.name for h in registry.hosts() if h.up]
        check_model_on_hosts(spec, hosts_model_facts(registry.r, up))
    return spec


def check_model_on_hosts(spec: EngineSpec, models: Mapping[str, Mapping[str, ModelFacts]]) -> None:
    """Refuse a local model path that no up host has (``models``: each up host's models
    as its worker published them), rather than start it and watch it fail: a typo'd
    path would otherwise be spawned, fail, and be classified ``model_not_found``.

    Let through, as before facts existed:

    * a Hugging Face repo id (a host downloads it at start);
    * any path when no up host publishes facts (workers of another version, or none
      scanned yet);
    * a path that exists where this check runs. Hosts scan their model roots every
      ~10 s and only so deep (``workers.host.model_facts``): a model copied in a moment
      ago, or deeper than the scan, is not in the facts yet. Where the API shares a
      machine or a file system with the workers (``make up``, the tests, an NFS model
      store) its own disk answers for them; elsewhere the facts decide.
    """
    if not is_path_like(spec.model):
        return
    published = [facts for facts in models.values() if facts]
    if not published:
        return
    embedding = spec.kind is EngineKind.EMBEDDING
    if any(find_facts(facts, spec.model, embedding=embedding) for facts in published):
        return
    if os.path.exists(os.path.expanduser(spec.model)):
        return
    hosts = ", ".join(sorted(name for name, facts in models.items() if facts))
    raise ValidationError(
        f"model: {spec.model!r} is on no host (looked on {hosts}); check the path, or "
        "`sagellm models` for the models each host has (hosts rescan every ~10 s)",
        field="model",
    )
