"""sagellm control plane: the Flask app factory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery
    from flask import Flask

    from app.settings import Settings

DOCS_STATIC = "/docs/static"


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
    from app.api import presets as presets_api
    from app.api.errors import SagellmApi, register_domain_errors
    from app.cli import sagellm
    from app.control import connect_cluster
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
    )
    if config:
        flask_app.config.update(config)
    settings = settings or Settings.from_env()
    flask_app.extensions["sagellm"] = connect_cluster(settings, celery)
    flask_app.extensions["sagellm.settings"] = settings

    api = SagellmApi(flask_app)
    api.register_blueprint(engines_api.blp)
    api.register_blueprint(cluster_api.blp)
    api.register_blueprint(presets_api.blp)
    register_domain_errors(flask_app)

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

        from app.metrics import render

        body = render(flask_app.extensions["sagellm"])
        return Response(body, mimetype="text/plain; version=0.0.4; charset=utf-8")

    _install_gateway(flask_app, settings)
    _install_auth(flask_app, settings)

    return flask_app


def _install_gateway(flask_app: Flask, settings: Settings) -> None:
    from app.core.models import EngineState
    from app.gateway.inflight import cluster_in_flight
    from app.gateway.routes import bp, make_gateway

    cluster = flask_app.extensions["sagellm"]
    gateway = make_gateway(
        lambda: cluster.registry.engines(state=EngineState.RUNNING),
        settings.gateway_policy,
        settings.gateway_read_timeout_s,
        settings.gateway_refresh_s,
    )
    flask_app.extensions["sagellm.gateway"] = gateway
    gateway.in_flight.start_publishing(cluster.registry.r)
    flask_app.extensions["sagellm.in_flight"] = lambda: cluster_in_flight(
        cluster.registry.r, gateway.in_flight
    )
    flask_app.register_blueprint(bp)
    from app.gateway.proxy import GatewayProxy

    # The proxied POST routes bypass Flask: see app/gateway/proxy.py.
    flask_app.wsgi_app = GatewayProxy(  # type: ignore[method-assign,assignment]
        flask_app.wsgi_app, gateway, settings.api_keys, settings.admin_token
    )


def _install_auth(flask_app: Flask, settings: Settings) -> None:
    """Optional bearer tokens: API keys for the gateway, an admin token for management.
    (The proxied POST routes check the same tokens in ``app.gateway.proxy``.)"""
    from flask import request

    from app.access import gateway_tokens, token_allowed
    from app.gateway.routes import openai_error

    admin = settings.admin_token
    gateway = gateway_tokens(settings.api_keys, admin)

    @flask_app.before_request
    def _check() -> Any:
        path = request.path
        auth = request.headers.get("Authorization", "")
        if path.startswith("/v1/management"):
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
