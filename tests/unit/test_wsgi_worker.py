"""The API worker's request-header parser (RFC 9112 section 5), on its own."""

from __future__ import annotations

import io
from typing import Any

import pytest

from app.wsgi_worker import MAX_HEADER_LINES, parse_header_lines


def _parse(raw: bytes) -> Any:
    return parse_header_lines(io.BytesIO(raw))


def test_fields_values_duplicates_and_what_follows_the_head() -> None:
    fp = io.BytesIO(
        b"Host: api:8000\r\ncontent-type:application/json \r\n"
        b"X-Tag: a\r\nX-Tag:\tb\r\nEmpty:\r\nLf-Only: yes\n\r\n{body}"
    )
    msg = parse_header_lines(fp)
    assert msg.get("host") == "api:8000"
    assert msg.get("Content-Type") == "application/json"  # OWS trimmed, name caseless
    assert msg.get_all("x-tag") == ["a", "b"]
    assert msg.get("Empty") == "" and msg.get("Lf-Only") == "yes"
    assert fp.read() == b"{body}"  # the body is left unread


def test_end_of_input_ends_the_head() -> None:
    assert _parse(b"Host: x\r\n").get("Host") == "x"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"Host : x\r\n\r\n", "malformed"),
        (b"X-A: 1\r\n folded\r\n\r\n", "obsolete line folding"),
        (b"X(A): 1\r\n\r\n", "malformed"),
        (b": no name\r\n\r\n", "malformed"),
        (b"no colon\r\n\r\n", "malformed"),
        (b"X-A: " + b"a" * 70000 + b"\r\n\r\n", "longer than"),
        (b"X-A: 1\r\n" * (MAX_HEADER_LINES + 1) + b"\r\n", "more than 100"),
        (b"Content-Length: 2\r\ncontent-length: 2\r\n\r\n", "more than one Content-Length"),
    ],
)
def test_malformed_heads_are_value_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        _parse(raw)


def test_exactly_the_limit_is_accepted() -> None:
    msg = _parse(b"X-A: 1\r\n" * MAX_HEADER_LINES + b"\r\n")
    assert len(msg.get_all("X-A")) == MAX_HEADER_LINES
