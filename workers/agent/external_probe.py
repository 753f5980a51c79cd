"""The probe of external engines (``app.core.external``): OpenAI-compatible endpoints
that sagellm did not start, registered so that the gateway routes to them.

Run by whichever worker takes ``sagellm.probe_external`` from the control queue: beat
sends it every health interval, and a registration sends one for its engine at once.
Not in the API: it may run several processes (gunicorn), each of which would probe
every endpoint, or need an election; beat is one per cluster, and probing engines is
the workers' work already.

A probe is ``GET <base>/v1/models`` with the engine's own key (``Authorization:
Bearer``), ``SAGELLM_HEALTH_TIMEOUT_S`` at most, no redirects; it passes when the list
names the engine's served name (``app.core.external.models_probe_failure``). The result
is written with the record's own health methods: a pass (``mark_healthy``) makes it
RUNNING and stamps ``last_health_at``, which also puts it back into each gateway
process's rotation after a failed request took it out; ``SAGELLM_UNHEALTHY_AFTER``
failures in a row (``count_failed_checks``) make it UNHEALTHY, saying why. Nothing else
happens to it: no restart, no signal, no reservation.

The key is read from ``app.state.external_keys`` for the request and never logged:
failure reasons name the URL, the status or the connection error, never a header.
"""

from __future__ import annotations

import logging
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from app.core.errors import IllegalTransition, NotFoundError
from app.core.external import MODELS_PATH, NOT_PROBED, models_probe_failure
from app.core.health import HealthPolicy, Verdict
from app.core.models import EngineRecord, EngineState
from app.state.events import encode_event
from app.state.external_keys import ExternalKeys
from app.state.registry import Registry

log = logging.getLogger(__name__)
S = EngineState
PARALLEL = 8  # endpoints probed at once: a slow one delays no other
_client: httpx.Client | None = None
_client_guard = threading.Lock()


def client() -> httpx.Client:
    """This process's client for probes: TLS verified against the system's CA store
    (as the gateway's transport does; ``SSL_CERT_FILE`` honoured), no proxy from the
    environment (the gateway uses none), no redirects."""
    global _client
    with _client_guard:
        if _client is None:
            _client = httpx.Client(verify=ssl.create_default_context(), trust_env=False)
        return _client


def check_endpoint(
    http: httpx.Client, rec: EngineRecord, api_key: str | None, timeout_s: float
) -> str | None:
    """Why the endpoint of ``rec`` does not serve its model now; None when it does."""
    assert rec.external_url is not None
    url = rec.external_url + MODELS_PATH
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = http.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:  # its text names the URL or the socket error only
        return f"GET {url}: {type(exc).__name__}: {exc}"
    try:
        body = resp.json()
    except ValueError:
        body = None
    failure = models_probe_failure(resp.status_code, body, rec.spec.name)
    return None if failure is None else f"GET {url}: {failure}"


def record_probe(
    registry: Registry, seen: EngineRecord, failure: str | None, policy: HealthPolicy
) -> str:
    """Write one probe's result (``failure``: None for a pass) to the record of ``seen``
    (the record as it was when probed); its state after, or ``"gone"`` when it was
    forgotten meanwhile."""

    def apply(rec: EngineRecord) -> None:
        if rec.external_url is None or rec.state not in (S.RUNNING, S.UNHEALTHY):
            raise IllegalTransition(f"engine {rec.id} is not a registered external engine")
        if failure is None:
            rec.mark_healthy(None)
            if rec.last_error == NOT_PROBED:
                rec.last_error = None
            return
        verdict, failures = policy.judge(rec.state, False, rec.health_failures)
        turn = rec.state is S.RUNNING and verdict is not Verdict.FAILING
        rec.count_failed_checks(None, failures, unhealthy=failure if turn else None)
        if rec.state is S.UNHEALTHY:
            rec.last_error = failure  # the reason it is out of service now

    def new_reason(rec: EngineRecord) -> list[str]:
        # One event per new reason (a state change has its own), not one per probe.
        if failure is None or failure == seen.last_error:
            return []
        return [encode_event("probe_failed", failure, failures=rec.health_failures)]

    try:
        return registry.update(seen.id, apply, events=new_reason).state.value
    except (NotFoundError, IllegalTransition):
        return "gone"


def probe_external_engines(
    registry: Registry,
    http: httpx.Client,
    policy: HealthPolicy,
    *,
    timeout_s: float,
    engine_id: str | None = None,
) -> dict[str, str]:
    """Probe every external engine (or only ``engine_id``) and record the results;
    engine id -> its state after (``"gone"``: forgotten meanwhile)."""
    records = [
        r
        for r in registry.engines(state=[S.RUNNING, S.UNHEALTHY])
        if r.external_url is not None and engine_id in (None, r.id)
    ]
    if not records:
        return {}
    api_keys = ExternalKeys.of(registry).read([r.id for r in records if r.api_key_set])

    def check(rec: EngineRecord) -> str | None:
        return check_endpoint(http, rec, api_keys.get(rec.id), timeout_s)

    with ThreadPoolExecutor(min(PARALLEL, len(records)), "external-probe") as pool:
        failures = list(pool.map(check, records))
    out = {}
    for rec, failure in zip(records, failures, strict=True):
        out[rec.id] = state = record_probe(registry, rec, failure, policy)
        if failure is not None:
            log.info("external engine %s (%s): %s", rec.id, state, failure)
    return out
