"""Bearer-token checks shared by the Flask routes and the WSGI proxy."""

from __future__ import annotations

from app.api.auth import (
    bearer_token,
    gateway_tokens,
    host_allowed,
    hosts_allowed_by_default,
    is_loopback,
    token_allowed,
    tokens_equal,
)


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


def test_non_ascii_tokens_are_refused_not_raised() -> None:
    # hmac.compare_digest raises TypeError on non-ASCII str: that was a 500.
    assert not token_allowed("Bearer caf\u00e9", ("adm",))
    assert not token_allowed("Bearer adm", ("caf\u00e9",))
    assert token_allowed("Bearer caf\u00e9", ("caf\u00e9",))
    assert tokens_equal("\u00fc", "\u00fc") and not tokens_equal("\u00fc", "u")


def test_loopback_binds_answer_loopback_names_only() -> None:
    allowed = hosts_allowed_by_default("127.0.0.1")
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "127.9.9.9", "[::1]:80"):
        assert host_allowed(host, allowed), host
    for host in ("rebind.attacker.example:8000", "", "localhost.attacker.example", "[::2]"):
        assert not host_allowed(host, allowed), host
    assert hosts_allowed_by_default("0.0.0.0") == ("*",)
    assert hosts_allowed_by_default("10.0.0.1") == ("*",)
    assert hosts_allowed_by_default("localhost") == hosts_allowed_by_default("::1")


def test_allowed_hosts_match_a_name_on_any_port_or_one_port() -> None:
    allowed = ("api.example", "other.example:9000", "[fe80::1]")
    assert host_allowed("API.example:8000", allowed)
    assert host_allowed("other.example:9000", allowed)
    assert not host_allowed("other.example:9001", allowed)
    assert host_allowed("[fe80::1]:8000", allowed)
    assert host_allowed("anything", ("*",))


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("")
