"""The CLI's side of the management API: where it is, the token, one JSON request, and
every failure as a ``CliError`` whose exit code follows the table in ``app.cli``.

The API is found at ``SAGELLM_API_URL`` (default from ``app.settings.SETTINGS_DOC``),
read straight from the environment: ``Settings.from_env`` would also validate worker
settings a CLI user has no reason to set. ``SAGELLM_ADMIN_TOKEN`` (else the token
``sagellm up`` generated on this machine) is sent as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

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
# A long-poll (``Follow``) asks the API to answer within this long when nothing changes
# (a change is answered at once). Short: a server's graceful stop waits for requests in
# flight, and one the CLI no longer waits for would hold it up until then.
LONG_POLL_S = 5.0
SEQ_HEADER = "X-Sagellm-Seq"  # the write number an engine list is as of


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
        return self.exchange(
            method, path, params=params, json=json, headers=headers, timeout_s=timeout_s
        )[0]

    def exchange(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> tuple[Any, httpx.Headers]:
        """``request``, and the answer's headers."""
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
            return body, resp.headers
        if not isinstance(body, dict):
            # Not our error shape: a proxy or something else answers at that address.
            text = resp.text.strip().replace("\n", " ")[:200]
            body = {"message": f"HTTP {resp.status_code} from {self.base_url}{path}: {text}"}
        raise api_error(resp.status_code, body)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def engine_changed(self, engine: dict[str, Any]) -> dict[str, Any]:
        """The record of ``engine`` as soon as it differs from this copy of it (a
        long-poll on its ``updated_at``), else the same record after ``LONG_POLL_S``."""
        rec: dict[str, Any] = self.request(
            "GET",
            f"{ENGINES}/{engine['id']}",
            params={"changed_from": engine["updated_at"], "timeout": LONG_POLL_S},
            timeout_s=LONG_POLL_S + REQUEST_TIMEOUT_S,
        )
        return rec

    def engines_changed(self, after: int | None = None) -> tuple[list[dict[str, Any]], int]:
        """Every engine record and the write number the list is as of; with ``after``
        (such a number), a long-poll: the list as soon as a record was written since,
        else after ``LONG_POLL_S``."""
        params = {} if after is None else {"changed_after": after, "timeout": LONG_POLL_S}
        engines, headers = self.exchange(
            "GET", ENGINES, params=params, timeout_s=LONG_POLL_S + REQUEST_TIMEOUT_S
        )
        return engines, int(headers.get(SEQ_HEADER) or 0)


def connect() -> ApiClient:
    """A client of the API at ``SAGELLM_API_URL``."""
    return ApiClient()


T = TypeVar("T")
_WAKE = object()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class Follow(Generic[T]):
    """What the API says as it changes, without polling it.

    A daemon thread calls ``fetch(last)`` in a loop: a long-poll that the API answers as
    soon as what ``last`` shows changed (else at its timeout); every answer is queued.
    The caller's thread takes them with ``wait``, which returns at the first answer, at
    ``wake()`` (another thread's news) or after ``timeout_s`` (for a live display to
    redraw): nothing sleeps a fixed interval, and the API is asked again only after it
    answered. The thread has its own connection; one left in a long-poll when its
    ``Follow`` ends finishes it and stops."""

    def __init__(self, fetch: Callable[[ApiClient, T], T], first: T, base_url: str) -> None:
        self._fetch = fetch
        self._last = first
        self._base_url = base_url
        self._news: queue.Queue[object] = queue.Queue()
        self._stopped = threading.Event()

    def __enter__(self) -> Follow[T]:
        threading.Thread(target=self._run, daemon=True, name="sagellm-follow").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()

    def _run(self) -> None:
        api = ApiClient(self._base_url)
        try:
            while not self._stopped.is_set():
                self._last = self._fetch(api, self._last)
                self._news.put(self._last)
        except BaseException as exc:  # handed to the caller's thread
            self._news.put(_Failed(exc))
        finally:
            api.close()

    def wake(self) -> None:
        """End the caller's current ``wait`` now (from another thread)."""
        self._news.put(_WAKE)

    def wait(self, timeout_s: float) -> list[T]:
        """Every answer that came since the last call, oldest first: at least one
        unless ``timeout_s`` passed or ``wake`` was called first. An error of the
        thread's request is raised here."""
        try:
            got = [self._news.get(timeout=max(0.0, timeout_s))]
        except queue.Empty:
            return []
        while True:
            try:
                got.append(self._news.get_nowait())
            except queue.Empty:
                break
        out: list[T] = []
        for item in got:
            if isinstance(item, _Failed):
                raise item.error
            if item is not _WAKE:
                out.append(item)  # type: ignore[arg-type]
        return out
