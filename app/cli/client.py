"""The CLI's side of the management API: where it is, the token, one JSON request, and
every failure as a ``CliError`` whose exit code follows the table in ``app.cli``.

The API is found at ``SAGELLM_API_URL`` (default from ``app.settings.SETTINGS_DOC``),
read straight from the environment: ``Settings.from_env`` would also validate worker
settings a CLI user has no reason to set. ``SAGELLM_ADMIN_TOKEN`` (else the token
``sagellm up`` generated on this machine) is sent as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import httpx

from app.settings import SETTINGS_DOC

API_URL_VAR = "SAGELLM_API_URL"
TOKEN_VAR = "SAGELLM_ADMIN_TOKEN"
ENGINES = "/v1/management/engines"
PRESETS = "/v1/management/presets"

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT

# Short requests answer from Redis; logs are read on the engine's host (up to 15 s).
REQUEST_TIMEOUT_S = 30.0


class CliError(click.ClickException):
    """A failure shown as ``Error: message`` plus indented reasons; exit code 1."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        # A placement error's message already lists its reasons: do not repeat them.
        self.reasons = [r for r in reasons if r not in message]

    def format_message(self) -> str:
        return "\n".join([self.message, *(f"  {r}" for r in self.reasons)])


class InvalidInput(CliError):
    """Input refused before anything was done: exit code 2."""

    exit_code = EXIT_INVALID


class Interrupted(CliError):
    """Ctrl-C while following: what the API was doing goes on."""

    exit_code = EXIT_INTERRUPTED


class ApiError(CliError):
    """The API answered with its error shape ``{code, status, message, ...}``."""

    def __init__(self, status_code: int, body: dict[str, Any]) -> None:
        message = str(body.get("message") or body.get("status") or f"HTTP {status_code}")
        if status_code == 401:
            message += f" (set {TOKEN_VAR} to the API's admin token)"
        super().__init__(message, reasons=[str(r) for r in body.get("reasons") or []])
        self.status_code = status_code
        self.body = body


class ApiInvalidInput(ApiError):
    """400/422: the API rejected the request as invalid; nothing was reserved."""

    exit_code = EXIT_INVALID


def api_error(status_code: int, body: dict[str, Any]) -> ApiError:
    """The ``ApiError`` for an error answer, by the exit-code table of ``app.cli``."""
    cls = ApiInvalidInput if status_code in (400, 422) else ApiError
    return cls(status_code, body)


def api_url() -> str:
    """``SAGELLM_API_URL`` from the environment, else its documented default."""
    raw = os.environ.get(API_URL_VAR, "").strip() or SETTINGS_DOC[API_URL_VAR][0]
    return raw.rstrip("/")


def admin_token() -> str:
    """``SAGELLM_ADMIN_TOKEN``, else the token ``sagellm up`` generated on this machine
    (``$SAGELLM_DATA_DIR/admin-token``), else ``""``."""
    from app.api.auth import read_admin_token

    token = os.environ.get(TOKEN_VAR, "").strip()
    if token:
        return token
    data_dir = os.environ.get("SAGELLM_DATA_DIR", "").strip() or SETTINGS_DOC["SAGELLM_DATA_DIR"][0]
    return read_admin_token(Path(data_dir).expanduser())


class ApiClient:
    """A small JSON client of the management API; every failure becomes a ``CliError``."""

    def __init__(self, base_url: str | None = None) -> None:
        self.base_url = base_url or api_url()
        headers = {"User-Agent": "sagellm-cli", "Accept": "application/json"}
        token = admin_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(base_url=self.base_url, headers=headers)

    def close(self) -> None:
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> Any:
        """Send one request; return the decoded JSON body of a 2xx answer."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            resp = self._client.request(
                method, path, params=query, json=json, headers=headers, timeout=timeout_s
            )
        except httpx.ConnectError as exc:
            raise CliError(
                f"cannot reach the sagellm API at {self.base_url}: {exc} (start it with "
                f"`make up` / `flask sagellm up`, or set {API_URL_VAR})"
            ) from None
        except httpx.TimeoutException:
            raise CliError(
                f"the sagellm API at {self.base_url} did not answer {method} {path} "
                f"within {timeout_s:g}s"
            ) from None
        except (httpx.RequestError, httpx.InvalidURL) as exc:
            raise CliError(
                f"request to the sagellm API at {self.base_url} failed: {exc} (check {API_URL_VAR})"
            ) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.is_success:
            return body
        if not isinstance(body, dict):
            # Not our error shape: a proxy or something else answers at that address.
            text = resp.text.strip().replace("\n", " ")[:200]
            body = {"message": f"HTTP {resp.status_code} from {self.base_url}{path}: {text}"}
        raise api_error(resp.status_code, body)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)


def connect() -> ApiClient:
    """A client of the API at ``SAGELLM_API_URL``."""
    return ApiClient()
