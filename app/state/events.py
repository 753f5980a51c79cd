"""Each engine's timeline: a bounded list of events in Redis, oldest first.

Events are facts worth showing a person ("placed on host a, GPU 0", "crashed:
cuda_oom", "remediated"): each is a JSON object ``{"at", "kind", "message", ...}``.
The list keeps the newest ``MAX_EVENTS``; it is deleted in the same atomic step as the
engine's record (``ledger._COMMIT``), and an event for an engine without a record is
dropped, so no timeline outlives its engine. State changes are appended by the record
write itself (kind ``"state"``), so they are never missing or out of order.

Kinds: ``placed``, ``spawned``, ``ready``, ``probe_failed``, ``crashed``,
``remediated``, ``draining``, ``drain_timeout``, ``stopped``, ``failed``,
``restarting``, and ``state`` (written by the commit script).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from app.state import keys
from app.state.lua_scripts import lua_script

MAX_EVENTS = 200

_ADD = lua_script("add_event.lua")  # appends only while the record exists


def encode_event(kind: str, message: str, **data: Any) -> str:
    """One event as stored: ``{"at": now, "kind", "message", **data}`` in JSON. Pass it
    to a record write (``Registry.create/update(..., events=[...])``) to append it in
    the same atomic step as the record, or use ``EngineEvents.add``."""
    return json.dumps({"at": time.time(), "kind": kind, "message": message, **data}, default=str)


class EngineEvents:
    """Append to and read engines' timelines."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._add = client.register_script(_ADD)

    def add(self, engine_id: str, kind: str, message: str, **data: Any) -> None:
        """Append one event (dropped if the engine has no record); keeps the newest
        ``MAX_EVENTS``. ``data`` must be JSON-serialisable."""
        self.add_encoded(engine_id, encode_event(kind, message, **data))

    def add_encoded(self, engine_id: str, event: str) -> None:
        """Append one event made by ``encode_event`` (see ``add``)."""
        self._add(
            keys=[keys.engine(engine_id), keys.engine_events(engine_id)], args=[event, MAX_EVENTS]
        )

    def list(self, engine_id: str) -> list[dict[str, Any]]:
        """The engine's events, oldest first (empty for an unknown engine)."""
        raws = self.r.lrange(keys.engine_events(engine_id), 0, -1)
        return [json.loads(raw) for raw in raws]


__all__ = ["MAX_EVENTS", "EngineEvents", "encode_event"]
