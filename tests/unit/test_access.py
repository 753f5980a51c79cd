"""Bearer-token checks shared by the Flask routes and the WSGI proxy."""

from __future__ import annotations

from app.access import bearer_token, gateway_tokens, token_allowed


def test_empty_tokens_never_match() -> None:
    assert not token_allowed("", ("",))
    assert not token_allowed("Bearer x", ("", ""))
    assert not token_allowed("Basic eA==", ("x",))
    assert token_allowed("bearer x", ("", "x"))


def test_gateway_tokens() -> None:
    assert gateway_tokens((), "adm") == ()  # no keys: the gateway is open
    assert gateway_tokens(("k1", ""), "") == ("k1",)
    assert gateway_tokens(("k1",), "adm") == ("k1", "adm")
    assert bearer_token("Bearer  k1 ") == "k1"
