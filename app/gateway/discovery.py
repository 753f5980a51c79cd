"""Which engines exist and are healthy, by the names clients use. No port scanning:
only the registry's RUNNING engines are backends.

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
    status_code = 503


@dataclass(frozen=True)
class Backend:
    engine_id: str
    kind: EngineKind
    base_url: str
    served_name: str
    names: frozenset[str]  # served name, model id, label
    last_health_at: float


@dataclass
class _View:
    at: float = 0.0
    backends: list[Backend] = field(default_factory=list)


def backends_from(records: Iterable[EngineRecord]) -> list[Backend]:
    out = []
    for rec in records:
        if rec.state is not EngineState.RUNNING or rec.base_url is None:
            continue
        names = {rec.spec.name, rec.spec.model}
        if rec.spec.label:
            names.add(rec.spec.label)
        out.append(
            Backend(
                engine_id=rec.id,
                kind=rec.spec.kind,
                base_url=rec.base_url,
                served_name=rec.spec.name,
                names=frozenset(names),
                last_health_at=rec.last_health_at or 0.0,
            )
        )
    return out


class BackendDirectory:
    def __init__(self, load: Callable[[], list[EngineRecord]], refresh_s: float = 1.0) -> None:
        self._load = load
        self._refresh_s = refresh_s
        self._view = _View()
        self._lock = threading.Lock()
        self._ejected: dict[str, float] = {}

    def backends(self) -> list[Backend]:
        now = time.monotonic()
        view = self._view
        # One thread reloads; the others keep serving from the current view rather
        # than queueing behind a Redis round trip (only the very first load waits).
        if now - view.at >= self._refresh_s and self._lock.acquire(blocking=not view.at):
            try:
                if now - self._view.at >= self._refresh_s:
                    self._view = _View(now, backends_from(self._load()))
                view = self._view
            finally:
                self._lock.release()
        return [b for b in view.backends if self._in_rotation(b)]

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
        the other kind is a 400 that says so; no backend is a 503.
        """
        live = self.backends()
        what = "chat/completions" if kind is EngineKind.LLM else "embeddings"
        if model is None or model == "":
            names = {b.served_name for b in live if b.kind is kind}
            if len(names) == 1:
                model = names.pop()
            elif not names:
                raise NoBackend(_start_hint(None, kind))
            else:
                raise ValidationError(
                    f"model: required when several models run ({', '.join(sorted(names))})",
                    field="model",
                )
        matching = [b for b in live if model in b.names]
        right = [b for b in matching if b.kind is kind]
        if right:
            return right
        if matching:
            other = matching[0].kind.value
            raise ValidationError(
                f"model: {model!r} is an {other} engine; it cannot serve {what}",
                field="model",
            )
        raise NoBackend(_start_hint(model, kind))


def _start_hint(model: str | None, kind: EngineKind) -> str:
    kind_flag = " --kind embedding" if kind is EngineKind.EMBEDDING else ""
    if model is None:
        return (
            f"no {kind.value} engine is running; start one with "
            f"`flask sagellm engine start <model>{kind_flag}`"
        )
    return (
        f"no healthy engine serves model {model!r}; start one with "
        f"`flask sagellm engine start {model}{kind_flag}`"
    )
