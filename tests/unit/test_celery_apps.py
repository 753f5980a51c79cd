"""The Celery apps: the API sends with one app built without the workers' code; the
workers' app is built from the settings when a worker or beat starts, on the same broker
settings (``app.state.queues.celery_config``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from app.settings import Settings
from app.state.queues import CONTROL_QUEUE, celery_config
from workers.celery_app import make_celery

API_PROCESS = textwrap.dedent(
    """
    import gc, sys
    from celery import Celery, _state
    import workers.celery_app as factory  # importing the factory builds nothing
    assert factory._process is None
    del sys.modules["workers.celery_app"], sys.modules["workers"]
    from app import create_app
    from app.settings import Settings
    create_app(Settings.from_env({"SAGELLM_REDIS_URL": "redis://127.0.0.1:9/0"}))
    # Celery's own fallback (``_state.default_app``) and proxies to an app are not apps.
    apps = {
        id(o) for o in gc.get_objects() if type(o) is Celery and o is not _state.default_app
    }
    loaded = sorted(m for m in sys.modules if m == "workers" or m.startswith("workers."))
    print(len(apps), loaded)
    """
)


def test_the_api_holds_one_celery_app_and_imports_no_worker_code() -> None:
    out = subprocess.run(
        [sys.executable, "-c", API_PROCESS], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1 []"


def test_workers_use_the_broker_settings_the_api_sends_with() -> None:
    settings = Settings.from_env({"SAGELLM_REDIS_URL": "redis://127.0.0.1:9/3"})
    app = make_celery(settings)
    shared = celery_config(settings.redis_url)
    assert {key: app.conf[key] for key in shared} == shared
    assert app.conf.broker_url == "redis://127.0.0.1:9/3"
    assert set(app.conf.beat_schedule) == {
        "health-fanout",
        "rediscovery-fanout",
        "prune",
        "external-probe",
    }
    probe = app.conf.beat_schedule["external-probe"]
    assert probe["task"] == "sagellm.probe_external"
    assert probe["options"]["queue"] == CONTROL_QUEUE
