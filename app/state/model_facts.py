"""The models each host has on its disk, with their facts, as its worker published them.

One hash per host (``keys.model_facts``): model id or path -> JSON ``ModelFacts``. The
worker replaces it as a whole (one MULTI/EXEC), so a reader sees one scan or the next,
never a mix. No TTL: a DOWN host's facts stay readable, and callers skip them for
placement (``app.state.allocation.placement_hosts``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping

import redis

from app.core.memory import ModelFacts
from app.state import keys
from app.state.client import as_text

log = logging.getLogger(__name__)


def publish_model_facts(client: redis.Redis, host: str, facts: Mapping[str, ModelFacts]) -> None:
    """Replace ``host``'s facts with ``facts`` in one atomic step."""
    key = keys.model_facts(host)
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    if facts:
        pipe.hset(key, mapping={k: json.dumps(f.to_dict()) for k, f in facts.items()})
    pipe.execute()


def model_facts_published(client: redis.Redis, host: str) -> bool:
    """Whether ``host`` has facts in Redis (False too after Redis lost them)."""
    return bool(client.exists(keys.model_facts(host)))


def host_model_facts(client: redis.Redis, host: str) -> dict[str, ModelFacts]:
    """``host``'s models by id or path; {} when it published none."""
    return hosts_model_facts(client, [host]).get(host, {})


def hosts_model_facts(
    client: redis.Redis, hosts: Iterable[str]
) -> dict[str, dict[str, ModelFacts]]:
    """The models of each of ``hosts`` by id or path, read in one round trip. An entry
    that does not parse (a worker of another version) is left out."""
    names = list(hosts)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.model_facts(name))
    out: dict[str, dict[str, ModelFacts]] = {}
    for name, raw in zip(names, pipe.execute(), strict=True):
        models: dict[str, ModelFacts] = {}
        for field, value in (raw or {}).items():
            try:
                models[as_text(field)] = ModelFacts.from_dict(json.loads(value))
            except (ValueError, TypeError, KeyError):
                log.warning("model facts of %s on host %s do not parse", as_text(field), name)
        out[name] = models
    return out
