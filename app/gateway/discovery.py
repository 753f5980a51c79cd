"""Which engines exist and are healthy, by the names clients use. No port scanning:
only the registry's RUNNING engines are backends.

A model no engine in service names (``EngineRecord.in_service``) does not exist here: a
404 (``ModelNotFound``) that lists the models served, as OpenAI answers, so a client
fails at once. A model whose engines are all starting, restarting or out of rotation
is a 503 (``NoBackend``): it is worth retrying.

The view is cached per process and re-read from Redis when an engine changes state:
each process hears every record write on ``keys.ENGINE_CHANGES`` (a subscriber thread,
``app.state.change_feed``, started on first use) and drops its view when the write
changes what it knows, so the next request reads the registry again and a DRAINING
engine gets nothing new within milliseconds. It is also re-read every ``refresh_s``
(the only way while the subscription is down). ``fresh_seq`` tells the process's
report (``app.state.gateway_report``) how current its routing is, which is what lets a
drain end safely.

A backend that fails a request is taken out of rotation here at once and comes back
when its host's health loop records a passing check after the failure
(``last_health_at``).

External engines (``app.core.external``: registered endpoints sagellm did not start)
are backends like the others, at their own base URL, probed by the workers' control
queue; their API keys are read with the view (``secrets``) and travel only in
``Backend.api_key``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from app.core.errors import SagellmError, ValidationError
from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineKind


class NoBackend(SagellmError):
    """The model is known, but none of its engines can take a request now."""

    status_code = 503


class ColdModel(NoBackend):
    """The model has no engine serving now, but on-demand engines of it exist
    (STANDBY, or already starting): the gateway starts one and waits
    (``app.gateway.cold``)."""

    def __init__(self, model: str, engines: list[Known]) -> None:
        super().__init__(f"model {model!r} is on standby; starting it")
        self.model = model
        self.engines = engines


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
    # An external engine's API key (``app.core.external``), sent to it alone as
    # ``Authorization: Bearer``; never shown (not in repr).
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Known:
    """An engine in service (``EngineRecord.in_service``), healthy or not."""

    engine_id: str
    kind: EngineKind
    state: EngineState
    served_name: str
    names: frozenset[str]
    on_demand: bool = False


@dataclass
class _View:
    at: float = 0.0  # monotonic time of the read (0: none yet)
    backends: list[Backend] = field(default_factory=list)
    known: list[Known] = field(default_factory=list)
    read_at: float = 0.0  # wall time the read began: it knows every write before
    generation: int = 0  # the directory's generation when the read began
    states: dict[str, str] = field(default_factory=dict)  # engine id -> state


class Feed(Protocol):
    """A subscription to record changes (``app.state.change_feed.ChangeFeed``)."""

    up: bool
    seq: int  # the write number up to which every change was heard (or read after)

    def start(self) -> None: ...


# Builds the feed of a directory, given what to call on a change and on a reset.
FeedFactory = Callable[[Callable[[str, str], None], Callable[[], None]], Feed]


def _names(rec: EngineRecord) -> frozenset[str]:
    names = {rec.spec.name, rec.spec.model}
    if rec.spec.label:
        names.add(rec.spec.label)
    return frozenset(names)


def known_from(records: Iterable[EngineRecord]) -> list[Known]:
    """Engines in service, and on-demand engines on STANDBY (a model that exists)."""
    return [
        Known(r.id, r.spec.kind, r.state, r.spec.name, _names(r), r.spec.on_demand)
        for r in records
        if r.in_service or r.state is EngineState.STANDBY
    ]


def backends_from(
    records: Iterable[EngineRecord], api_keys: Mapping[str, str] | None = None
) -> list[Backend]:
    """The RUNNING engines as backends; ``api_keys``: external engines' keys by id."""
    api_keys = api_keys or {}
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
                api_key=api_keys.get(rec.id),
            )
        )
    return out


class BackendDirectory:
    """``load`` returns engine records (any state): RUNNING ones are the backends, those
    in service are the models that exist. ``feed``: builds the subscription to record
    changes (None: re-read every ``refresh_s`` only)."""

    def __init__(
        self,
        load: Callable[[], list[EngineRecord]],
        refresh_s: float = 1.0,
        feed: FeedFactory | None = None,
        secrets: Callable[[list[str]], dict[str, str]] | None = None,
    ) -> None:
        self._load = load
        self._secrets = secrets  # engine ids -> external engines' API keys
        self._refresh_s = refresh_s
        self._view = _View()
        self._lock = threading.Lock()
        self._ejected: dict[str, float] = {}
        # Bumped by each change heard that the view does not show: a view read in an
        # older generation is not used again.
        self._generation = 0
        self._dropped_at = 0.0  # wall time of the last bump
        self._feed = feed(self._changed, self._reset) if feed is not None else None

    def _changed(self, engine_id: str, state: str) -> None:
        if self._view.states.get(engine_id) != state:
            self._reset()

    def _reset(self) -> None:
        self._dropped_at = time.time()
        self._generation += 1

    def _stale(self, view: _View, now: float) -> bool:
        old = now - view.at >= self._refresh_s
        return not view.at or old or view.generation != self._generation

    def _current(self) -> _View:
        if self._feed is not None:
            self._feed.start()  # once per process (after gunicorn's fork)
        now = time.monotonic()
        view = self._view
        if not self._stale(view, now):
            return view
        # One thread reloads. When the view is only old, the others keep serving from
        # it rather than queueing behind a Redis round trip; when a change made it
        # wrong (or there is none yet), they wait for the new one.
        changed = not view.at or view.generation != self._generation
        if not self._lock.acquire(blocking=changed):
            return view
        try:
            if self._stale(self._view, time.monotonic()):
                generation, read_at, began = self._generation, time.time(), time.monotonic()
                records = self._load()
                self._view = _View(
                    began,
                    backends_from(records, self._api_keys(records)),
                    known_from(records),
                    read_at=read_at,
                    generation=generation,
                    states={r.id: r.state.value for r in records},
                )
            return self._view
        finally:
            self._lock.release()

    def _api_keys(self, records: list[EngineRecord]) -> dict[str, str]:
        """The API keys of the external engines among ``records`` that have one."""
        wanted = [r.id for r in records if r.api_key_set and r.state is EngineState.RUNNING]
        return self._secrets(wanted) if wanted and self._secrets is not None else {}

    def fresh_seq(self) -> int | None:
        """The write number (``app.state.write_seq``) up to which this process's
        routing knows every engine state change (None: no subscription, it cannot
        tell): the number its subscription has heard up to (``ChangeFeed.seq``). A
        heard change that the view does not show makes the next request read the
        registry again (and wait for it), and a view is read only after the changes
        before it were heard, so no request is routed on older knowledge. A number,
        not a time: it compares with the drain's on any machine."""
        if self._feed is None:
            return None
        self._feed.start()  # a process that routed nothing yet still hears changes
        return self._feed.seq

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

    def standby(self) -> list[Known]:
        """On-demand engines on STANDBY (listed by ``/v1/models``: they exist)."""
        return [k for k in self._current().known if k.state is EngineState.STANDBY]

    def refresh(self) -> None:
        """Read the registry again before the next request (a cold start just ended)."""
        self._reset()

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
        cold = [k for k in known if k.on_demand and k.kind is kind]
        if cold:
            raise ColdModel(model, cold)
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
