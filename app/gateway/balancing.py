"""Which replica gets a request. Pure: policies see candidates and in-flight counts."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

from app.core.balancing import BALANCER_NAMES
from app.core.errors import UnknownPolicyError


class HasId(Protocol):
    @property
    def engine_id(self) -> str: ...


B = TypeVar("B", bound=HasId)


class BalancingPolicy:
    """Orders candidates, best first; the caller tries the first and fails over."""

    name = ""

    def order(self, candidates: Sequence[B], in_flight: Mapping[str, int]) -> list[B]:
        raise NotImplementedError


class LeastOutstanding(BalancingPolicy):
    """Fewest requests in flight first; ties rotate so equal replicas share load."""

    name = "least_outstanding"

    def __init__(self) -> None:
        self._tie = itertools.count()
        self._lock = threading.Lock()

    def order(self, candidates: Sequence[B], in_flight: Mapping[str, int]) -> list[B]:
        with self._lock:
            shift = next(self._tie)
        n = len(candidates)
        rotated = [candidates[(i + shift) % n] for i in range(n)] if n else []
        return sorted(rotated, key=lambda b: in_flight.get(b.engine_id, 0))


class RoundRobin(BalancingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = itertools.count()
        self._lock = threading.Lock()

    def order(self, candidates: Sequence[B], in_flight: Mapping[str, int]) -> list[B]:
        if not candidates:
            return []
        with self._lock:
            start = next(self._next) % len(candidates)
        return list(candidates[start:]) + list(candidates[:start])


BALANCERS: dict[str, type[BalancingPolicy]] = {p.name: p for p in (LeastOutstanding, RoundRobin)}
# The settings accept the names of ``app.core.balancing``: a policy added here without
# its name there (or the reverse) stops the gateway at import, not at the first request.
if set(BALANCERS) != set(BALANCER_NAMES):
    raise RuntimeError(
        f"balancing policies {sorted(BALANCERS)} and app.core.balancing.BALANCER_NAMES "
        f"{sorted(BALANCER_NAMES)} disagree"
    )


def make_balancer(name: str) -> BalancingPolicy:
    """The policy registered under ``name``; unknown names are an error."""
    try:
        return BALANCERS[name]()
    except KeyError:
        raise UnknownPolicyError(
            f"balancing policy {name!r} is unknown; known: {', '.join(sorted(BALANCERS))}",
            field="SAGELLM_GATEWAY_POLICY",
        ) from None
