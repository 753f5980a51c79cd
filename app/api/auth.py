"""Who may talk to the API: bearer tokens, the ``Host`` allow-list, the local admin token.

One implementation for the Flask routes and the gateway's plain-WSGI proxy:

* Tokens are compared as UTF-8 bytes in constant time (``tokens_equal``):
  ``hmac.compare_digest`` raises ``TypeError`` on non-ASCII ``str``, which was a 500.
* ``HostGuard`` answers 421 to a ``Host`` header not on the allow-list, before any
  route (management, gateway, /metrics, /docs) sees the request. A browser page that
  rebinds its own DNS name to 127.0.0.1 (DNS rebinding) can reach a loopback-bound
  API, but it cannot make the browser send ``Host: localhost``: so an API bound to
  loopback answers loopback names only, unless ``SAGELLM_ALLOWED_HOSTS`` says more.
* ``sagellm up`` keeps a generated admin token in ``<data_dir>/admin-token`` (mode
  0600); the CLI on that machine reads it when ``SAGELLM_ADMIN_TOKEN`` is unset.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ADMIN_TOKEN_FILE = "admin-token"
ANY_HOST = "*"
# Names that always resolve to this machine (a rebinding page cannot send them).
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})


# ---------------------------------------------------------------------------- tokens


def bearer_token(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, else ``""``."""
    return authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""


def tokens_equal(given: str, expected: str) -> bool:
    """Constant-time comparison of two tokens of any characters (never raises)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def token_allowed(authorization: str, allowed: Iterable[str]) -> bool:
    """True when the header carries one of ``allowed``. Empty tokens never match, on
    either side: an unset setting must not admit a request that sends no token."""
    token = bearer_token(authorization)
    return bool(token) and any(tokens_equal(token, a) for a in allowed if a)


def gateway_tokens(api_keys: Iterable[str], admin_token: str) -> tuple[str, ...]:
    """Tokens the gateway accepts: the API keys and the admin token; empty = open."""
    keys = tuple(k for k in api_keys if k)
    return (*keys, admin_token) if keys and admin_token else keys


def admin_token_path(data_dir: Path) -> Path:
    return Path(data_dir) / ADMIN_TOKEN_FILE


def read_admin_token(data_dir: Path) -> str:
    """The token ``sagellm up`` generated on this machine, else ``""``."""
    try:
        return admin_token_path(data_dir).read_text().strip()
    except OSError:
        return ""


def ensure_admin_token(data_dir: Path) -> tuple[str, bool]:
    """The admin token kept in ``<data_dir>/admin-token``, created (mode 0600, readable
    by this user only) when missing; and whether it was created now."""
    existing = read_admin_token(data_dir)
    if existing:
        return existing, False
    path = admin_token_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # O_EXCL: two `up`s racing never overwrite a token the other already handed out.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token, True


# ---------------------------------------------------------------------------- Host


def is_loopback(host: str) -> bool:
    """True for a loopback address or name (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def hosts_allowed_by_default(bind_host: str) -> tuple[str, ...]:
    """``Host`` values answered when ``SAGELLM_ALLOWED_HOSTS`` is unset: loopback names
    for an API bound to loopback (DNS-rebinding protection), else any."""
    return ("localhost", "127.0.0.0/8", "::1") if is_loopback(bind_host) else (ANY_HOST,)


def _split_host(value: str) -> tuple[str, str]:
    """``"[::1]:80"`` -> ``("::1", "80")``; ``"Example.org"`` -> ``("example.org", "")``."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, port
    return value, ""  # a name, or a bare IPv6 address


def host_allowed(host_header: str, allowed: Iterable[str]) -> bool:
    """True when ``host_header`` matches an entry: ``*``, ``host`` (any port),
    ``host:port``, or a network such as ``127.0.0.0/8`` (for IP literals)."""
    host, port = _split_host(host_header)
    if not host:
        return False
    for entry in allowed:
        if entry == ANY_HOST:
            return True
        if "/" in entry:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        want_host, want_port = _split_host(entry)
        if host == want_host and (not want_port or port == want_port):
            return True
    return False


StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class HostGuard:
    """WSGI middleware, outermost: 421 Misdirected Request for a ``Host`` header that is
    not allowed, on every route."""

    def __init__(self, app: WsgiApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = allowed
        self.open = ANY_HOST in allowed

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        if self.open:
            return self.app(environ, start)
        host = environ.get("HTTP_HOST") or ""
        if host_allowed(host, self.allowed):
            return self.app(environ, start)
        message = (
            f"this API does not answer for Host {host!r}; allowed: {', '.join(self.allowed)}. "
            "Set SAGELLM_ALLOWED_HOSTS to the names clients use for it"
        )
        body = {"code": 421, "status": "Misdirected Request", "field": "Host", "message": message}
        if (environ.get("PATH_INFO") or "").startswith("/v1/") and not (
            environ.get("PATH_INFO") or ""
        ).startswith("/v1/management"):
            # The gateway's clients (OpenAI SDKs) read OpenAI's error shape.
            body = {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": "Host",
                    "code": "misdirected_request",
                }
            }
        data = json.dumps(body).encode()
        start(
            "421 Misdirected Request",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        return [data]
