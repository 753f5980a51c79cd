"""Bearer-token checks, one implementation for the Flask routes and the WSGI proxy."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


def bearer_token(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, else ``""``."""
    return authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""


def token_allowed(authorization: str, allowed: Iterable[str]) -> bool:
    """True when the header carries one of ``allowed``. Empty tokens never match, on
    either side: an unset setting must not admit a request that sends no token."""
    token = bearer_token(authorization)
    return bool(token) and any(hmac.compare_digest(token, a) for a in allowed if a)


def gateway_tokens(api_keys: Iterable[str], admin_token: str) -> tuple[str, ...]:
    """Tokens the gateway accepts: the API keys and the admin token; empty = open."""
    keys = tuple(k for k in api_keys if k)
    return (*keys, admin_token) if keys and admin_token else keys
