"""External engines: OpenAI-compatible endpoints that sagellm did not start, registered
(``POST /v1/management/engines/register``) so that the gateway routes to them.

Pure rules: what a base URL may be and how it is normalised, what an API key may be,
what a probe's answer means, and the record that stands for such an endpoint.

An external engine's record has ``external_url``: its base URL, the server root that
``/v1/...`` paths are appended to, exactly like the ``base_url`` of an engine sagellm
started (``http://h:8000`` and ``http://h:8000/v1`` are both accepted and stored as
``http://h:8000``). It has no host, port, GPUs or process: it holds no reservation and
nothing ever signals it. It is UNHEALTHY until its first probe and whenever probes
fail (``GET <base>/v1/models`` must list its served name), RUNNING while they pass;
the gateway routes to it only while RUNNING. ``DELETE`` forgets it: the record goes.

Its API key never enters the record (``api_key_set`` says whether it has one): it is
kept under its own Redis key (``app.state.external_keys``), deleted in the same atomic
step as the record, and sent only to that endpoint, as ``Authorization: Bearer``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from app.core.errors import SagellmError, ValidationError
from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineKind, EngineSpec, shown

MODELS_PATH = "/v1/models"  # what the probe GETs, under the base URL
BASE_URL_MAX = 2048
API_KEY_MAX = 4096
# The key goes into a request header as it is: visible ASCII only, so it can never
# end the header early (CR, LF) or be sent in another encoding.
API_KEY_RE = re.compile(r"^[\x21-\x7e]+$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
# A path prefix goes into the request line as it is: plain characters only.
_PATH_RE = re.compile(r"^[A-Za-z0-9._~/-]*$")
NOT_PROBED = "registered; waiting for its first probe (GET <base>/v1/models)"


class DuplicateRegistration(SagellmError):
    """The same endpoint is already registered under the same served name."""

    status_code = 409


def _refuse(why: str) -> ValidationError:
    # The URL itself is never quoted: it may hold a secret the user did not mean to send.
    return ValidationError(f"base_url: {why}", field="base_url")


def normalise_base_url(url: str) -> str:
    """The base URL to record for ``url``: ``http(s)://host[:port][/prefix]``, with a
    trailing ``/`` and ``/v1`` dropped (the gateway appends ``/v1/chat/completions``,
    ``/v1/embeddings``, and the probe ``/v1/models``). ``ValidationError`` (field
    ``base_url``) naming the reason otherwise: no credentials, query or fragment (they
    would land in the record), a host, a valid port."""
    if len(url) > BASE_URL_MAX:
        raise _refuse(f"at most {BASE_URL_MAX} characters, got {len(url)}")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise _refuse("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refuse(f"not a valid URL ({exc})") from None
    if port == 0:
        raise _refuse("port 0 is not a port a server listens on")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _refuse("must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise _refuse(
            "credentials in the URL are refused (they would be stored in the record); "
            "send the key as api_key, which is kept apart"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise _refuse(
            "a query or fragment is refused (it could carry a secret into the record, and "
            "the gateway would not send it)"
        )
    host = parts.hostname or ""
    if not host:
        raise _refuse("needs a host, as in http://host:8000")
    if not _HOST_RE.match(host):
        raise _refuse("the host must be a DNS name or an IPv4 address")
    path = parts.path.rstrip("/")
    if not _PATH_RE.match(path):
        raise _refuse("the path may hold only letters, digits and ._~/-")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{scheme}://{host}{'' if port is None else f':{port}'}{path}"


def check_api_key(key: str) -> str:
    """The key itself when it may be stored and sent; ``ValidationError`` (field
    ``api_key``) otherwise. The message never quotes the key."""
    if not 1 <= len(key) <= API_KEY_MAX:
        raise ValidationError(
            f"api_key: 1-{API_KEY_MAX} characters, got {len(key)}", field="api_key"
        )
    if not API_KEY_RE.match(key):
        raise ValidationError(
            "api_key: visible ASCII characters only (no spaces or line breaks)", field="api_key"
        )
    return key


def external_record(
    engine_id: str, served_name: str, kind: EngineKind, base_url: str, *, api_key_set: bool
) -> EngineRecord:
    """The record of a newly registered endpoint (``base_url`` normalised): UNHEALTHY,
    not routed to, until its first probe passes. Not a transition: there was no record."""
    return EngineRecord(
        id=engine_id,
        spec=EngineSpec(model=served_name, kind=kind, use_gpu=False),
        state=EngineState.UNHEALTHY,
        external_url=base_url,
        api_key_set=api_key_set,
        last_error=NOT_PROBED,
    )


def probed(rec: EngineRecord) -> bool:
    """Its probe has run at least once since it was registered."""
    return rec.last_health_at is not None or rec.health_failures > 0


def models_probe_failure(status: int, body: Any, served_name: str) -> str | None:
    """What is wrong with an endpoint whose ``GET /v1/models`` answered ``status`` with
    ``body`` (decoded JSON, None if it was not JSON); None: it serves ``served_name``."""
    if status in (401, 403):
        return f"HTTP {status}: it refused the request (is the API key right?)"
    if not 200 <= status < 300:
        return f"HTTP {status}"
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return "its answer is not an OpenAI model list"
    ids = [m.get("id") for m in data if isinstance(m, dict)]
    if served_name not in ids:
        return f"it does not serve {served_name!r} (it lists {shown(ids)})"
    return None
