"""The API keys of external engines (``app.core.external``), kept apart from their
records so that no answer, event or log built from a record can carry one.

One string per engine (``keys.external_api_key``). The key is written before its record
exists, with a TTL: a registration that dies before its record is written leaves
nothing behind for long; ``keep`` drops the TTL once the record is there. The record
delete (``ledger._COMMIT``, mode ``delete``) deletes the key in the same atomic step.

Readers: the gateway (to send ``Authorization: Bearer <key>`` to that endpoint only)
and the probe of external engines. Nothing else reads a key; nothing returns one to a
client.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import redis

from app.state import keys

if TYPE_CHECKING:
    from app.state.registry import Registry

# Seconds a key written before its record may live without one.
UNCLAIMED_TTL_S = 60


class ExternalKeys:
    """Store, read and drop external engines' API keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    @classmethod
    def of(cls, registry: Registry) -> ExternalKeys:
        """On the Redis that ``registry`` uses."""
        return cls(registry.r)

    def put(self, engine_id: str, api_key: str) -> None:
        """Store the key of an engine whose record is about to be created; it expires
        unless ``keep`` is called once the record exists."""
        self.r.set(keys.external_api_key(engine_id), api_key, ex=UNCLAIMED_TTL_S)

    def keep(self, engine_id: str) -> None:
        """The record exists: keep the key for as long as the record (its delete
        deletes the key)."""
        self.r.persist(keys.external_api_key(engine_id))

    def drop(self, engine_id: str) -> None:
        """Delete the key of an engine whose record could not be created."""
        self.r.delete(keys.external_api_key(engine_id))

    def read(self, engine_ids: Iterable[str]) -> dict[str, str]:
        """The keys of those engines that have one, in one round trip."""
        ids = list(engine_ids)
        if not ids:
            return {}
        raws = self.r.mget([keys.external_api_key(i) for i in ids])
        return {
            i: raw.decode() if isinstance(raw, bytes) else str(raw)
            for i, raw in zip(ids, raws, strict=True)
            if raw is not None
        }

    def get(self, engine_id: str) -> str | None:
        """One engine's key, if it has one."""
        return self.read([engine_id]).get(engine_id)
