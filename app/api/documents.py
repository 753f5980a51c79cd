"""JSON responses assembled from engine records as Redis stores them.

A record is stored as the API's JSON representation of it (``EngineRecord.to_dict``,
which ``EngineSchema`` documents), so a list of records is answered by joining the
stored bytes: no record is decoded, validated or encoded again per request. The view
still declares its schema with ``@blp.response`` (OpenAPI); flask-smorest passes a
``Response`` through as it is.

The lists a status read returns are the same objects until Redis says something in
them was written (``app.state.snapshot``), so what is encoded from one of them is kept
with it (``EncodedOnce``) and sent again while it has not changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from flask import Response

from app.state.snapshot import EngineDocument


def engine_list(engines: Iterable[EngineDocument], status: int = 200) -> Response:
    """A JSON array of records. Cost per engine: the bytes of its record."""
    return json_response(joined(engines), status)


def joined(engines: Iterable[EngineDocument]) -> bytes:
    """A JSON array of stored records, joined as they are."""
    return b"[" + b",".join(d.raw for d in engines) + b"]"


def encode(data: Any) -> bytes:
    """``data`` (already shaped as its schema dumps it) as compact JSON."""
    return json.dumps(data, separators=(",", ":")).encode()


def json_object(members: Iterable[tuple[str, bytes]], status: int = 200) -> Response:
    """A JSON object of already encoded members, in this order (copied once)."""
    pieces = [b"{"]
    for name, value in members:
        pieces += [json.dumps(name).encode(), b":", value, b","]
    pieces[-1] = b"}" if len(pieces) > 1 else b"{}"
    return json_response(b"".join(pieces), status)


def plain(data: Any, status: int = 200) -> Response:
    """``data`` (already shaped as its schema dumps it) as JSON, without the per-field
    schema walk."""
    return json_response(encode(data), status)


class EncodedOnce:
    """What ``encode`` made of the last arguments it was given, kept while the caller
    gives it the same again: the same objects (a status read's unchanged lists: by
    identity) and equal tuples (small values the answer depends on too)."""

    def __init__(self, encode: Callable[..., bytes]) -> None:
        self._encode = encode
        self._last: tuple[tuple[Any, ...], bytes] | None = None

    def __call__(self, *args: Any) -> bytes:
        last = self._last
        if last is not None and len(last[0]) == len(args) and all(map(_same, last[0], args)):
            return last[1]
        out = self._encode(*args)
        self._last = (args, out)  # holds the objects: their ids are not reused meanwhile
        return out


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is tuple and type(b) is tuple and a == b)


def json_response(body: bytes, status: int = 200) -> Response:
    """Already encoded JSON as the answer."""
    return Response(body, status=status, mimetype="application/json")
