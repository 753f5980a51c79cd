"""Which engines exist and are healthy, by the names clients use. No port scanning:
only the registry's RUNNING engines are backends.

A model no engine in service names (``EngineRecord.in_service``) does not exist here: a
404 (``ModelNotFound``) that lists the models served, as OpenAI answers, so a client
fails at once. A model whose engines are all starting, restarting or out of rotation
is a 503 (``NoBackend``): it is worth retrying.

The view is refreshed from Redis at most every ``refresh_s`` per process. A backend
that fails a request is taken out of rotation here at once and comes back when its
host's health loop records a passing check after the failure (``last_health_at``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from app.core.errors import SagellmError, ValidationError
from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineKind


class NoBackend(SagellmError):
    """The model is known, but none of its engines can take a request now."""

    status_code = 503


class ModelNotFound(SagellmError):
    """No engine in service serves the model (a typo, or it was never started)."""

    status_code = 404


@dataclass(frozen=True)
class Backend:
    engine_id: str
    kind: EngineKind
    base_url: str
    served_name: str
    names: frozenset[str]  # served name, model id, label
    last_health_at: float


@dataclass(frozen=True)
class Known:
    """An engine in service (``EngineRecord.in_service``), healthy or not."""

    engine_id: str
    kind: EngineKind
    state: EngineState
    served_name: str
    names: frozenset[str]


@dataclass
class _View:
    at: float = 0.0
    backends: list[Backend] = field(default_factory=list)
    known: list[Known] = field(default_factory=list)


def _names(rec: EngineRecord) -> frozenset[str]:
    names = {rec.spec.name, rec.spec.model}
    if rec.spec.label:
        names.add(rec.spec.label)
    return frozenset(names)


def known_from(records: Iterable[EngineRecord]) -> list[Known]:
    return [
        Known(r.id, r.spec.kind, r.state, r.spec.name, _names(r)) for r in records if r.in_service
    ]


def backends_from(records: Iterable[EngineRecord]) -> list[Backend]:
    out = []
    for rec in records:
        if rec.state is not EngineState.RUNNING or rec.base_url is None:
            continue
        out.append(
            Backend(
                engine_id=rec.id,
                kind=rec.spec.kind,
                base_url=rec.base_url,
                served_name=rec.spec.name,
                names=_names(rec),
                last_health_at=rec.last_health_at or 0.0,
            )
        )
    return out


class BackendDirectory:
    """``load`` returns engine records (any state): RUNNING ones are the backends, those
    in service are the models that exist."""

    def __init__(self, load: Callable[[], list[EngineRecord]], refresh_s: float = 1.0) -> None:
        self._load = load
        self._refresh_s = refresh_s
        self._view = _View()
        self._lock = threading.Lock()
        self._ejected: dict[str, float] = {}

    def _current(self) -> _View:
        now = time.monotonic()
        view = self._view
        # One thread reloads; the others keep serving from the current view rather
        # than queueing behind a Redis round trip (only the very first load waits).
        if now - view.at >= self._refresh_s and self._lock.acquire(blocking=not view.at):
            try:
                if now - self._view.at >= self._refresh_s:
                    records = self._load()
                    self._view = _View(now, backends_from(records), known_from(records))
                view = self._view
            finally:
                self._lock.release()
        return view

    def backends(self) -> list[Backend]:
        return [b for b in self._current().backends if self._in_rotation(b)]

    def _in_rotation(self, b: Backend) -> bool:
        ejected_at = self._ejected.get(b.engine_id)
        if ejected_at is None:
            return True
        if b.last_health_at > ejected_at:  # a health check passed since: back in
            self._ejected.pop(b.engine_id, None)
            return True
        return False

    def eject(self, engine_id: str) -> None:
        """Out of rotation until its next passing health check."""
        self._ejected[engine_id] = time.time()

    def resolve(self, model: str | None, kind: EngineKind) -> list[Backend]:
        """Healthy backends of ``kind`` serving ``model`` (served name, model id or label).

        ``model`` omitted: the one model of that kind, if exactly one runs. A model of
        the other kind is a 400 that says so; a model no engine in service names is a
        404 (``ModelNotFound``); a known model with no healthy engine is a 503.
        """
        view = self._current()
        live = [b for b in view.backends if self._in_rotation(b)]
        what = "chat/completions" if kind is EngineKind.LLM else "embeddings"
        if model is None or model == "":
            names = {b.served_name for b in live if b.kind is kind}
            if len(names) > 1:
                raise ValidationError(
                    f"model: required when several models run ({', '.join(sorted(names))})",
                    field="model",
                )
            if not names:
                waiting = [k for k in view.known if k.kind is kind]
                if waiting:
                    raise NoBackend(f"no {kind.value} engine is healthy now ({_states(waiting)})")
                raise ModelNotFound(_start_hint(kind, view.known), field="model")
            model = names.pop()
        matching = [b for b in live if model in b.names]
        right = [b for b in matching if b.kind is kind]
        if right:
            return right
        known = [k for k in view.known if model in k.names]
        kinds = [b.kind for b in matching] + [k.kind for k in known]
        other = next((k for k in kinds if k is not kind), None)
        if other is not None and not any(k.kind is kind for k in known):
            raise ValidationError(
                f"model: {model!r} is an {other.value} engine; it cannot serve {what}",
                field="model",
            )
        if known:
            raise NoBackend(f"model {model!r} has no healthy engine now ({_states(known)})")
        raise ModelNotFound(
            f"the model {model!r} does not exist here; {_served(view.known)}", field="model"
        )


def _states(known: list[Known]) -> str:
    shown = [f"{k.engine_id} {k.state.value}" for k in known[:5]]
    more = f", {len(known) - 5} more" if len(known) > 5 else ""
    return ", ".join(shown) + more


def _served(known: list[Known]) -> str:
    names = sorted({k.served_name for k in known})
    if not names:
        return "no model is served yet (GET /v1/models lists them)"
    return f"models served: {', '.join(names)} (GET /v1/models lists the healthy ones)"


def _start_hint(kind: EngineKind, known: list[Known]) -> str:
    kind_flag = " --kind embedding" if kind is EngineKind.EMBEDDING else ""
    return (
        f"no {kind.value} engine is served here; {_served(known)}. Start one with "
        f"`flask sagellm engine start <model>{kind_flag}`"
    )
