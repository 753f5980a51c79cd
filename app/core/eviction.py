"""Making room: which idle on-demand engines to hand back to STANDBY so a start fits.

Pure: the caller gives the hosts as the ledger sees them (``PlacementHost``) and the
engines that may be evicted (``Candidate``: on demand, not pinned to GPUs, serving,
nothing in flight). ``plan_eviction`` looks, host by host, for the fewest of them,
least recently used first, whose reserved memory lets ``need`` fit there; the caller
then hands their room to the new engine in one atomic write (``app.state.allocation``),
so an eviction never frees room that another start could take instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from app.core.allocation import Requirement, place_requirement
from app.core.errors import PlacementError
from app.core.placement import Placement, PlacementHost, PlacementPolicy


@dataclass(frozen=True)
class Candidate:
    """An engine that may be evicted: its host, what it holds per GPU (uuid, MiB),
    and when it last served a request (or became ready)."""

    engine_id: str
    host: str
    gpus: tuple[tuple[str, int], ...]
    last_used: float


@dataclass(frozen=True)
class EvictionPlan:
    placement: Placement
    victims: tuple[str, ...]  # least recently used first


def _without(host: PlacementHost, victims: Sequence[Candidate]) -> PlacementHost:
    """``host`` as it would be once ``victims`` gave their room back."""
    freed: dict[str, int] = {}
    for v in victims:
        for uuid, mib in v.gpus:
            freed[uuid] = freed.get(uuid, 0) + mib
    gpus = tuple(
        replace(g, reserved_mib=max(0, g.reserved_mib - freed.get(g.uuid, 0))) for g in host.gpus
    )
    return replace(host, gpus=gpus)


def plan_eviction(
    need: Requirement,
    hosts: Sequence[PlacementHost],
    candidates: Sequence[Candidate],
    policy: PlacementPolicy | str,
    margin_mib: int,
) -> EvictionPlan | None:
    """The fewest ``candidates`` on one host (least recently used first) whose room
    lets ``need`` fit, and where it would land; None when evicting cannot help."""
    best: EvictionPlan | None = None
    for host in hosts:
        if not host.up:
            continue
        mine = sorted((c for c in candidates if c.host == host.name), key=lambda c: c.last_used)
        for k in range(1, len(mine) + 1):
            if best is not None and k >= len(best.victims):
                break
            try:
                placed = place_requirement(need, [_without(host, mine[:k])], policy, margin_mib)
            except PlacementError:
                continue
            best = EvictionPlan(placed, tuple(c.engine_id for c in mine[:k]))
            break
    return best
