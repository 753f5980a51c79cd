"""sagellm control plane."""

from __future__ import annotations

from typing import Any


def create_app(config: dict[str, Any] | None = None) -> Any:
    """Flask app factory (``flask --app app``): registers the ``flask sagellm`` group."""
    from flask import Flask

    from app.cli import sagellm

    flask_app = Flask(__name__)
    if config:
        flask_app.config.update(config)
    flask_app.cli.add_command(sagellm)
    return flask_app
