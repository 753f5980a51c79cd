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

    return flask_app
