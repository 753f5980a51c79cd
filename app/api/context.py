"""Access to the cluster (registry, ledger, celery, settings) from a request."""

from __future__ import annotations

from flask import current_app

from app.services.cluster import Cluster


def cluster() -> Cluster:
    return current_app.extensions["sagellm"]
