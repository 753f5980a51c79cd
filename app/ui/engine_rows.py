"""The engines table's rows, like ``kubectl get pods``: one frozen row per record.

A row holds exactly what the table shows, so it is the row's cache key too
(``app.ui.freshness``): a record write that changes nothing shown (a health check's
timestamp) gives an equal row. Rows are built once per stored record version
(``RowMemo``, keyed by the record's stored bytes, which ``Registry.snapshot`` hands
back unchanged while the record is unchanged).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from app.core.gpus import mib_to_gb
from app.core.models import EngineState
from app.core.runtimes import DEFAULT_RUNTIME
from app.core.spec import KINDS, EngineKind
from app.state.snapshot import EngineDocument
from app.ui.cluster_view import engine_label
from app.ui.freshness import digest

STATES = tuple(s.value for s in EngineState)
# States in which an engine has a process that has served: uptime is counted from
# ``running_since`` only then.
_SERVING = frozenset(
    {EngineState.RUNNING.value, EngineState.UNHEALTHY.value, EngineState.DRAINING.value}
)


@dataclass(frozen=True)
class EngineFilter:
    """The table's filters (query arguments); empty strings mean any."""

    state: str = ""
    host: str = ""
    kind: str = ""

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> EngineFilter:
        """Unknown values are ignored rather than refused: a filter from an old page."""
        state = args.get("state", "")
        kind = args.get("kind", "")
        return cls(
            state=state if state in STATES else "",
            host=args.get("host", "")[:128],
            kind=kind if kind in KINDS else "",
        )

    def keeps(self, row: EngineRow) -> bool:
        return (
            (not self.state or row.state == self.state)
            and (not self.host or row.host == self.host)
            and (not self.kind or row.kind == self.kind)
        )


@dataclass(frozen=True)
class EngineRow:
    id: str
    name: str
    model: str
    kind: str
    runtime: str
    state: str
    host: str
    gpus: str  # "0,1"
    port: int | None
    memory_mib: int  # per GPU
    created_at: float
    since: float | None  # serving since (uptime), else None
    state_since: float
    restarts: int
    failure: str  # the reason its last process ended, if any
    in_flight: int = 0

    @property
    def memory_gb(self) -> float:
        return mib_to_gb(self.memory_mib)


def engine_row(doc: Mapping[str, Any]) -> EngineRow:
    """The row of one stored record (``EngineRecord.to_dict``)."""
    spec = doc.get("spec") or {}
    kind = str(spec.get("kind") or EngineKind.LLM.value)
    default = DEFAULT_RUNTIME[EngineKind(kind)] if kind in KINDS else ""
    runtime = spec.get("runtime") or default
    state = str(doc.get("state", ""))
    failure = doc.get("failure") or {}
    return EngineRow(
        id=str(doc["id"]),
        name=engine_label(dict(doc)),
        model=str(spec.get("model", "")),
        kind=kind,
        runtime=str(runtime),
        state=state,
        host=str(doc.get("host") or ""),
        gpus=",".join(str(g["index"]) for g in doc.get("gpus") or []),
        port=doc.get("port"),
        memory_mib=int(doc.get("memory_per_gpu_mib") or 0) if doc.get("gpus") else 0,
        created_at=float(doc.get("created_at") or 0.0),
        since=doc.get("running_since") if state in _SERVING else None,
        state_since=float(doc.get("state_changed_at") or 0.0),
        restarts=int(doc.get("restart_count") or 0),
        failure=str(failure.get("reason") or ""),
    )


class RowMemo:
    """Rows by stored record bytes, each with a token (a digest of the row, made once
    per record version): a table's key is its rows' tokens. Keeps the rows of the
    latest read only (give it every record of a snapshot, then filter the rows: pages
    with different filters share it)."""

    def __init__(self) -> None:
        self._rows: dict[bytes, tuple[EngineRow, str]] = {}
        self._lock = threading.Lock()

    def rows(
        self, docs: Iterable[EngineDocument], in_flight: Mapping[str, int]
    ) -> list[tuple[EngineRow, str]]:
        """``(row, token)`` per record, oldest first; in-flight counts filled in."""
        with self._lock:
            old = self._rows
        new: dict[bytes, tuple[EngineRow, str]] = {}
        out = []
        for d in docs:
            entry = old.get(d.raw)
            if entry is None:
                row = engine_row(d.doc)
                entry = (row, digest(row))
            new[d.raw] = entry
            row, token = entry
            n = in_flight.get(d.id, 0)
            out.append((replace(row, in_flight=n), f"{token}+{n}") if n else entry)
        with self._lock:
            self._rows = new
        return out


def state_counts(docs: Iterable[EngineDocument]) -> list[tuple[str, int]]:
    """Engines per state, in the state machine's order (states with none left out)."""
    counts = Counter(d.state for d in docs)
    known = [(s, counts[s]) for s in STATES if counts.get(s)]
    return known + sorted((s, n) for s, n in counts.items() if s not in STATES)
