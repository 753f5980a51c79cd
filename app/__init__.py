"""sagellm control plane: the Flask app factory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery
    from flask import Flask

    from app.settings import Settings

DOCS_STATIC = "/docs/static"
# OpenAPI security schemes: the admin token (/v1/management, /metrics when asked) and
# the gateway's API keys (/v1/* of the OpenAI-style routes).
ADMIN_SCHEME = "adminToken"
GATEWAY_SCHEME = "apiKey"


def create_app(
    settings: Settings | None = None,
    celery: Celery | None = None,
    config: dict[str, Any] | None = None,
) -> Flask:
    """The API server (``flask --app app``, gunicorn ``app:create_app()``) with the
    ``flask sagellm`` CLI group attached."""
    from flask import Flask, send_from_directory

    from app.api import cluster as cluster_api
    from app.api import engines as engines_api
    from app.api import models as models_api
    from app.api import presets as presets_api
    from app.api.errors import SagellmApi, register_domain_errors
    from app.cli import sagellm
    from app.services.cluster import connect_cluster
    from app.settings import Settings

    flask_app = Flask(__name__)
    flask_app.cli.add_command(sagellm)
    flask_app.config.update(
        API_TITLE="sagellm",
        API_VERSION="0.1.0",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        # Served from the swagger-ui-bundle wheel: the docs work offline (no CDN).
        OPENAPI_SWAGGER_UI_URL=f"{DOCS_STATIC}/",
        JSON_SORT_KEYS=False,
        # Every documented operation is /v1/management unless it says otherwise (the
        # gateway's routes do): Swagger UI's Authorize button then sends the token.
        API_SPEC_OPTIONS={"security": [{ADMIN_SCHEME: []}]},
    )
    if config:
        flask_app.config.update(config)
    settings = settings or Settings.from_env()
    allowed_hosts = check_exposure(settings)
    settings.engine_policy()  # a bad SAGELLM_ENGINE_UNSAFE_FLAGS stops start-up
    flask_app.extensions["sagellm"] = connect_cluster(settings, celery)
    flask_app.extensions["sagellm.settings"] = settings

    api = SagellmApi(flask_app)
    api.register_blueprint(engines_api.blp)
    api.register_blueprint(cluster_api.blp)
    api.register_blueprint(presets_api.blp)
    api.register_blueprint(models_api.blp)
    register_domain_errors(flask_app)
    from app.api.openapi import document_security_and_gateway

    document_security_and_gateway(
        api.spec, ADMIN_SCHEME, GATEWAY_SCHEME, gateway_open=not settings.api_keys
    )

    import swagger_ui_bundle

    assets = str(swagger_ui_bundle.swagger_ui_path)

    @flask_app.get(f"{DOCS_STATIC}/<path:filename>")
    def swagger_assets(filename: str) -> Any:
        return send_from_directory(assets, filename)

    @flask_app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @flask_app.get("/metrics")
    def metrics() -> Any:
        from flask import Response

        from app.api.metrics import render

        body = render(flask_app.extensions["sagellm"])
        return Response(body, mimetype="text/plain; version=0.0.4; charset=utf-8")

    from app.ui import install as install_dashboard

    install_dashboard(flask_app)  # /ui/ (and / redirects there); its data needs the token
    _install_gateway(flask_app, settings)
    _install_auth(flask_app, settings)
    from app.api.auth import HostGuard

    # Outermost: the Host check runs before the gateway's proxy and every Flask route.
    flask_app.wsgi_app = HostGuard(  # type: ignore[method-assign,assignment]
        flask_app.wsgi_app, allowed_hosts
    )

    return flask_app


def check_exposure(settings: Settings) -> tuple[str, ...]:
    """Refuse to serve management open on a non-loopback address; return the ``Host``
    values the API answers.

    The listen address is the one ``sagellm up`` binds: the host of
    ``SAGELLM_API_URL`` (``app.dev.stack.api_bind``). Management access is code execution
    on every GPU host, so without ``SAGELLM_ADMIN_TOKEN`` only loopback is served,
    unless ``SAGELLM_ALLOW_OPEN_API=1`` says the open API is intended.
    """
    from app.api.auth import hosts_allowed_by_default, is_loopback
    from app.core.errors import ConfigError
    from app.dev.stack import api_listen_host

    host = api_listen_host(settings.api_url)
    if not settings.admin_token and not settings.allow_open_api and not is_loopback(host):
        raise ConfigError(
            f"the API listens on {host} (SAGELLM_API_URL={settings.api_url}) and "
            "SAGELLM_ADMIN_TOKEN is unset: anyone who reaches it could start processes on "
            "every GPU host. Set SAGELLM_ADMIN_TOKEN, or SAGELLM_ALLOW_OPEN_API=1 to serve "
            "it without a token anyway",
            field="SAGELLM_ADMIN_TOKEN",
        )
    if settings.metrics_require_token and not settings.admin_token:
        raise ConfigError(
            "SAGELLM_METRICS_REQUIRE_TOKEN=1 needs SAGELLM_ADMIN_TOKEN (the token /metrics "
            "then requires)",
            field="SAGELLM_METRICS_REQUIRE_TOKEN",
        )
    return settings.allowed_hosts or hosts_allowed_by_default(host)


def _install_gateway(flask_app: Flask, settings: Settings) -> None:
    from app.gateway.routes import bp, make_gateway

    cluster = flask_app.extensions["sagellm"]
    gateway = make_gateway(
        cluster.registry.engines,  # RUNNING ones serve; those in service are known models
        settings.gateway_policy,
        settings.gateway_read_timeout_s,
        settings.gateway_refresh_s,
        changes=cluster.registry.r,  # record writes keep discovery current (drains)
    )
    flask_app.extensions["sagellm.gateway"] = gateway
    # Its report (in flight, routing freshness, request ages) for drains and idle stops.
    gateway.traffic.start_reporting(cluster.gateway_reports)
    # On-demand engines: the first request starts one.
    from app.gateway.cold import ColdStarter
    from app.services.on_demand import wake_engine

    gateway.cold = ColdStarter(
        wake=lambda engine_id: wake_engine(cluster, engine_id),
        wait=cluster.registry.wait,
        timeout_s=settings.cold_start_timeout_s,
    )
    flask_app.extensions["sagellm.in_flight"] = lambda: cluster.gateway_reports.total(
        gateway.traffic
    )
    flask_app.register_blueprint(bp)
    from app.gateway.proxy import GatewayProxy

    # The proxied POST routes bypass Flask: see app/gateway/proxy.py.
    flask_app.wsgi_app = GatewayProxy(  # type: ignore[method-assign,assignment]
        flask_app.wsgi_app, gateway, settings.api_keys, settings.admin_token
    )


def _install_auth(flask_app: Flask, settings: Settings) -> None:
    """Bearer tokens: API keys for the gateway, the admin token for management (and
    /metrics when SAGELLM_METRICS_REQUIRE_TOKEN=1). The proxied POST routes check the
    same tokens in ``app.gateway.proxy``, through ``app.api.auth``."""
    from flask import request

    from app.api.auth import gateway_tokens, token_allowed
    from app.gateway.routes import openai_error
    from app.ui.access import needs_admin_token as dashboard_data

    admin = settings.admin_token
    gateway = gateway_tokens(settings.api_keys, admin)
    metrics_need_admin = settings.metrics_require_token

    @flask_app.before_request
    def _check() -> Any:
        path = request.path
        auth = request.headers.get("Authorization", "")
        if (
            path.startswith("/v1/management")
            or dashboard_data(path, request.endpoint)  # /ui/data/...: all but page shells
            or (metrics_need_admin and path == "/metrics")
        ):
            if admin and not token_allowed(auth, (admin,)):
                return (
                    {
                        "code": 401,
                        "status": "Unauthorized",
                        "field": "Authorization",
                        "message": "this API needs SAGELLM_ADMIN_TOKEN as "
                        "'Authorization: Bearer <token>'",
                    },
                    401,
                    {"WWW-Authenticate": "Bearer"},
                )
        elif path.startswith("/v1/") and gateway and not token_allowed(auth, gateway):
            return openai_error(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                kind="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None
