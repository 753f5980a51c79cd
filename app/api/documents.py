"""JSON responses assembled from engine records as Redis stores them.

A record is stored as the API's JSON representation of it (``EngineRecord.to_dict``,
which ``EngineSchema`` documents), so a list of records is answered by joining the
stored bytes: no record is decoded, validated or encoded again per request. The view
still declares its schema with ``@blp.response`` (OpenAPI); flask-smorest passes a
``Response`` through as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from flask import Response

from app.state.snapshot import EngineDocument


def engine_list(engines: Iterable[EngineDocument], status: int = 200) -> Response:
    """A JSON array of records. Cost per engine: the bytes of its record."""
    return _json(b"[" + b",".join(d.raw for d in engines) + b"]", status)


def with_engines(
    body: Mapping[str, Any], engines: Iterable[EngineDocument], status: int = 200
) -> Response:
    """``body`` (JSON-encoded as usual) with an ``engines`` array of records added."""
    rest = json.dumps(body, separators=(",", ":")).encode()
    head = b'{"engines":' + b"[" + b",".join(d.raw for d in engines) + b"]"
    return _json(head + (b"," + rest[1:] if len(rest) > 2 else b"}"), status)


def plain(data: Any, status: int = 200) -> Response:
    """``data`` (already shaped as its schema dumps it) as JSON, without the per-field
    schema walk."""
    return _json(json.dumps(data, separators=(",", ":")).encode(), status)


def _json(body: bytes, status: int) -> Response:
    return Response(body, status=status, mimetype="application/json")
