"""The cluster page's data: hosts, and per GPU who holds its memory.

Built from one ``Registry.snapshot`` (the read ``GET /v1/management/status`` answers
from) and the same per-GPU arithmetic (``app.core.status.gpu_rows``): a GPU's total is
split into the memory each of our engines reserved (from the ledger's reservations),
what outside processes hold, the safety margin, and what is free for new engines.
Plain frozen data: a card's values are its cache key (``app.ui.freshness``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from app.core import status as views
from app.core.gpus import mib_to_gb
from app.core.models import TERMINAL_STATES, EngineState
from app.state.snapshot import Snapshot

LOST = EngineState.LOST.value
ENDED = frozenset(s.value for s in TERMINAL_STATES)


@dataclass(frozen=True)
class Segment:
    """One part of a GPU's memory bar."""

    kind: str  # "engine", "outside", "margin" or "free"
    mib: int
    start: float  # where it starts, in percent of the GPU's total
    width: float  # its width, in percent
    label: str = ""
    engine_id: str = ""
    state: str = ""

    @property
    def gb(self) -> float:
        return mib_to_gb(self.mib)


@dataclass(frozen=True)
class GpuBar:
    index: int
    name: str
    uuid: str
    total_mib: int
    reserved_mib: int
    outside_mib: int
    margin_mib: int
    available_mib: int
    segments: tuple[Segment, ...]
    utilization_pct: int | None = None

    @property
    def total_gb(self) -> float:
        return mib_to_gb(self.total_mib)

    @property
    def overcommitted_mib(self) -> int:
        """Memory held beyond the total (outside processes grew after reservations)."""
        return max(0, self.reserved_mib + self.outside_mib - self.total_mib)


@dataclass(frozen=True)
class EngineChip:
    """An engine of a host that holds no GPU (CPU engines), or that is LOST."""

    engine_id: str
    label: str
    state: str


@dataclass(frozen=True)
class HostCard:
    name: str
    address: str
    up: bool
    heartbeat_at: float | None
    gpu_source: str
    port_range: tuple[int, int]
    gpus: tuple[GpuBar, ...]
    cpu_engines: tuple[EngineChip, ...]
    engine_count: int
    lost_count: int


def engine_label(doc: dict[str, Any]) -> str:
    """What a person calls an engine: its label, else its served name, else the last
    part of its model's id or path."""
    spec = doc.get("spec") or {}
    name = spec.get("label") or spec.get("served_model_name")
    if name:
        return str(name)
    return str(spec.get("model", "")).rstrip("/").rsplit("/", 1)[-1]


def _pct(mib: int, total: int) -> float:
    return round(100.0 * mib / total, 3) if total else 0.0


def _segments(
    total: int, engines: list[tuple[int, str, str, str]], outside: int, margin: int, free: int
) -> tuple[Segment, ...]:
    """Bar segments left to right: engines (largest first), outside, margin, free; each
    clipped to what is left of the total."""
    out: list[Segment] = []
    at = 0
    parts: list[tuple[str, int, str, str, str]] = [
        ("engine", mib, label, eid, state) for mib, label, eid, state in engines
    ]
    unowned = (("outside", outside), ("margin", margin), ("free", free))
    parts += [(kind, mib, "", "", "") for kind, mib in unowned]
    for kind, mib, label, eid, state in parts:
        shown = max(0, min(mib, total - at))
        out.append(Segment(kind, mib, _pct(at, total), _pct(shown, total), label, eid, state))
        at += shown
    return tuple(out)


# A host as the cluster fragment sees it, in plain tuples (cheap to compare and to
# digest): name, address, up, heartbeat time, GPU source, port range, its GPUs
# (index, name, uuid, total, outside, reserved, available, utilization, and the
# engines holding memory on it: MiB, label, id, state), and its live engines (id,
# label, state, whether it holds GPUs).
HostInputs = tuple[Any, ...]


def cluster_inputs(snap: Snapshot, margin_mib: int) -> tuple[HostInputs, ...]:
    """What the cluster page shows, per host, from one snapshot (with capacity and
    reservations): the fragment's cache key, and what ``host_card`` builds a card of."""
    docs = {d.id: d.doc for d in snap.engines}
    held: dict[str, list[tuple[int, str, str, str]]] = defaultdict(list)
    for res in snap.reservations:
        doc = docs.get(res.engine_id)
        label = engine_label(doc) if doc else res.engine_id
        state = str(doc.get("state", "")) if doc else ""
        for uuid, mib in res.gpus:
            held[uuid].append((mib, label, res.engine_id, state))
    rows_by_host: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in views.gpu_rows(snap.hosts, snap.capacity, margin_mib):
        rows_by_host[row["host"]].append(row)
    active: dict[str, list[tuple[str, str, str, bool]]] = defaultdict(list)
    for d in snap.engines:
        host, state = d.doc.get("host"), str(d.doc.get("state", ""))
        if host and state not in ENDED:
            active[str(host)].append((d.id, engine_label(d.doc), state, bool(d.doc.get("gpus"))))
    out = []
    for h in snap.hosts:
        gpus = tuple(
            (
                int(r["index"]),
                str(r["name"]),
                str(r["uuid"]),
                int(r["total_mib"]),
                int(r["outside_mib"]),
                int(r["reserved_mib"]),
                int(r["available_mib"]),
                r.get("utilization_pct"),
                tuple(sorted(held.get(r["uuid"], []), key=lambda e: (-e[0], e[2]))),
            )
            for r in sorted(rows_by_host[h.name], key=lambda r: int(r["index"]))
        )
        out.append(
            (
                h.name,
                h.address,
                h.up,
                round(h.heartbeat_at, 1),
                h.gpu_source,
                tuple(h.port_range),
                gpus,
                tuple(active[h.name]),
            )
        )
    return tuple(out)


def without_heartbeat(host: HostInputs) -> HostInputs:
    """A host's inputs less its heartbeat time: what its GPU bars depend on (a heartbeat
    alone re-renders a card's header, not its bars)."""
    return (*host[:3], None, *host[4:])


def host_card(host: HostInputs, margin_mib: int) -> HostCard:
    """The card of one host's ``cluster_inputs``: a memory bar per GPU."""
    name, address, up, heartbeat_at, gpu_source, port_range, gpus, engines = host
    bars = []
    for index, gpu_name, uuid, total, outside, reserved, available, util, holders in gpus:
        margin = max(0, min(margin_mib, total - outside - reserved))
        bars.append(
            GpuBar(
                index=index,
                name=gpu_name,
                uuid=uuid,
                total_mib=total,
                reserved_mib=reserved,
                outside_mib=outside,
                margin_mib=margin,
                available_mib=available,
                segments=_segments(total, list(holders), outside, margin, available),
                utilization_pct=util,
            )
        )
    return HostCard(
        name=name,
        address=address,
        up=up,
        heartbeat_at=heartbeat_at,
        gpu_source=gpu_source,
        port_range=port_range,
        gpus=tuple(bars),
        cpu_engines=tuple(
            EngineChip(i, label, st) for i, label, st, on_gpu in engines if not on_gpu
        ),
        engine_count=len(engines),
        lost_count=sum(1 for e in engines if e[2] == LOST),
    )
