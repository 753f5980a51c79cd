"""One engine's page: what its record says, how it was launched, how to reach it.

Plain functions of a stored record (``EngineRecord.to_dict``) and its log lines.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.core.models import TERMINAL_STATES, EngineRecord
from app.core.spec import EngineKind

# The line ``workers.host.processes.spawn`` writes before each start of an engine.
_LAUNCH_LINE = re.compile(
    r"^=== sagellm \d{4}-\d\d-\d\d \d\d:\d\d:\d\d engine (?P<id>\S+): (?P<argv>.*)$"
)
# Record fields the page does not show: a write that changes only these is not news.
VOLATILE_FIELDS = frozenset({"updated_at", "last_health_at", "health_failures"})


def launch_command(lines: Sequence[str], engine_id: str) -> str | None:
    """The command line of the engine's latest start, from its log's header line."""
    for line in reversed(lines):
        m = _LAUNCH_LINE.match(line)
        if m and m.group("id") == engine_id:
            return m.group("argv")
    return None


def shown_record(doc: dict[str, Any]) -> dict[str, Any]:
    """The record without the fields that change without news (the page's cache key)."""
    return {k: v for k, v in doc.items() if k not in VOLATILE_FIELDS}


@dataclass(frozen=True)
class Actions:
    """Which buttons an engine's page offers in its state."""

    drain: bool  # a stop that drains first (a serving engine)
    stop: bool
    restart: bool


def actions(doc: dict[str, Any]) -> Actions:
    """From the record's own rules: a serving engine (``EngineRecord.drainable``) is
    stopped with a drain or at once; anything not stopped or stopping
    (``EngineRecord.stopped_or_stopping``) can be stopped and restarted (what
    ``services.engines.restart_engine`` accepts)."""
    rec = EngineRecord.from_dict(doc)
    live = not rec.stopped_or_stopping
    return Actions(drain=live and rec.drainable, stop=live, restart=live)


def is_final(state: str) -> bool:
    return state in {s.value for s in TERMINAL_STATES}


@dataclass(frozen=True)
class Snippets:
    route: str
    curl: str
    python: str


def snippets(doc: dict[str, Any], api_base: str, needs_key: bool) -> Snippets:
    """``curl`` and OpenAI-SDK snippets that reach the engine through the gateway (by
    its served name, as the gateway routes). Keys are never shown: a variable stands
    in for one when the gateway needs it."""
    spec = doc.get("spec") or {}
    model = str(spec.get("served_model_name") or spec.get("model") or "")
    embedding = spec.get("kind") == EngineKind.EMBEDDING.value
    base = api_base.rstrip("/") + "/v1"
    if embedding:
        route = "/v1/embeddings"
        body: dict[str, Any] = {"model": model, "input": "hello"}
        call = f"client.embeddings.create(model={model!r}, input='hello').data[0].embedding[:4]"
    else:
        route = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
        call = (
            f"client.chat.completions.create(model={model!r}, "
            "messages=[{'role': 'user', 'content': 'hello'}]).choices[0].message.content"
        )
    auth = ' -H "Authorization: Bearer $SAGELLM_API_KEY"' if needs_key else ""
    curl = (
        f"curl -s {base}{route.removeprefix('/v1')}{auth} \\\n"
        f"  -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(json.dumps(body))}"
    )
    key = 'os.environ["SAGELLM_API_KEY"]' if needs_key else '"unused"'
    python = (
        ("import os\n" if needs_key else "")
        + "import openai\n\n"
        + f"client = openai.OpenAI(base_url={base!r}, api_key={key})\n"
        + f"print({call})"
    )
    return Snippets(route, curl, python)


def events_view(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The timeline newest first, each ``{at, kind, message, data}`` as the API's
    ``/events`` shapes it."""
    out = []
    for ev in events:
        ev = dict(ev)
        at, kind, message = ev.pop("at", None), ev.pop("kind", ""), ev.pop("message", "")
        out.append({"at": at, "kind": kind, "message": message, "data": ev})
    return out[::-1]
