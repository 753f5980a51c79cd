"""Retention: ended engine records are deleted after a while, and reservations that no
record owns are released."""

from __future__ import annotations

import time

from app.core.models import EngineRecord, EngineState
from app.state.ledger import Ledger
from app.state.registry import Registry


def prune_records(registry: Registry, ledger: Ledger, older_than_s: float) -> list[str]:
    """Delete STOPPED/FAILED records older than ``older_than_s``; whatever they still
    hold is released in the same atomic step. Reservations no record owns any more
    (left by a crash of an older version) are released too. Returns the deleted ids."""
    cutoff = time.time() - older_than_s

    def prunable(rec: EngineRecord) -> bool:
        return rec.owns_nothing and rec.state_changed_at <= cutoff

    pruned = [
        rec.id
        for rec in registry.engines(state=[EngineState.STOPPED, EngineState.FAILED])
        if prunable(rec) and registry.delete(rec.id, only_if=prunable)
    ]
    for eid in ledger.reserved_engines():
        rec = registry.find(eid)
        if rec is None or rec.owns_nothing:
            ledger.release(eid)
    return pruned
