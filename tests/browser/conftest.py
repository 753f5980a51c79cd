"""The dashboard in a real browser: Debian's Chromium driven by Selenium, against a real
stack (redis-server, two Celery workers with mock GPUs, beat, the API over HTTP,
stand-in engines from ``tests/fakes/vllm``).

One stack and one browser for the whole module (the tests run in file order and build
on each other's engines: the suite must stay within about 90 s on 2 cores). Nothing is
downloaded: Selenium is pointed at ``/usr/bin/chromedriver`` and ``/usr/bin/chromium``
(``SAGELLM_CHROMEDRIVER`` / ``SAGELLM_CHROMIUM`` to use others); without them the
tests skip and say how to install them.

Addresses and ports of this suite: 127.0.20.x, ports 18800-18899.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import REPO, ClusterEnv, wait_until, worker

CHROMIUM = os.environ.get("SAGELLM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SAGELLM_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL_HINT = (
    "the dashboard's browser tests need Chromium and its driver: on Debian/Ubuntu "
    "`sudo apt-get install -y chromium chromium-driver` (or set SAGELLM_CHROMIUM and "
    "SAGELLM_CHROMEDRIVER); nothing is downloaded by the tests"
)
TOKEN = "ui-test-admin-token"
API_HOST = "127.0.20.1"
API_PORTS = range(18890, 18900)
ENGINE_PORTS = "18800-18849"
# Two hosts: gpu-a has an 80 GB GPU of which outside processes hold 10 GB, and a 24 GB
# one; gpu-b (a second loopback address) has one 24 GB GPU and is killed by the last
# test (DOWN host, LOST engines).
HOSTS = {
    "gpu-a": ("127.0.20.1", '[{"total_gb": 80, "outside_gb": 10}, {"total_gb": 24}]'),
    "gpu-b": ("127.0.20.2", '[{"total_gb": 24}]'),
}
SCREENSHOTS = REPO / "docs" / "screenshots"
VIEWPORT = (1280, 800)
STARTUP_DELAY_S = 1.2


class ApiServer:
    """The API (``create_app``) over real HTTP in this process (threaded werkzeug), on
    the suite's own address."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        last: OSError | None = None
        for port in API_PORTS:
            try:
                self.server = make_server(API_HOST, port, app, threaded=True)
                break
            except OSError as exc:
                last = exc
        else:
            raise RuntimeError(f"no free port in {API_PORTS} on {API_HOST}: {last}")
        self.url = f"http://{API_HOST}:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()


@dataclass
class Stack:
    env: ClusterEnv
    api: ApiServer
    app: Any
    tmp: Path
    urls_seen: list[str] = field(default_factory=list)  # every URL the pages requested
    engines: dict[str, str] = field(default_factory=dict)  # engine ids the tests share

    @property
    def url(self) -> str:
        return self.api.url

    def screenshot_path(self, name: str) -> Path:
        """``docs/screenshots/<name>.png`` when asked to refresh them
        (``SAGELLM_UPDATE_SCREENSHOTS=1``) or when it is missing; else a temp file."""
        committed = SCREENSHOTS / f"{name}.png"
        if os.environ.get("SAGELLM_UPDATE_SCREENSHOTS") == "1" or not committed.exists():
            committed.parent.mkdir(parents=True, exist_ok=True)
            return committed
        return self.tmp / f"{name}.png"


def _browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{path} not found: {INSTALL_HINT}"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from app import create_app
    from app.settings import Settings

    tmp = tmp_path_factory.mktemp("ui")
    env = ClusterEnv.create(
        tmp,
        SAGELLM_PORT_RANGE=ENGINE_PORTS,
        SAGELLM_ADMIN_TOKEN=TOKEN,
        SAGELLM_DRAIN_TIMEOUT_S="5",
        # the stand-in fails a repo id with the typo "Instrcut" as the hub does
        FAKE_VLLM_CHECK_MODEL="1",
        # and listens after this long: long enough for a 1 s poll to see STARTING
        FAKE_VLLM_STARTUP_DELAY=str(STARTUP_DELAY_S),
    )
    # A stand-in for cpu-demo's tiny chat model (its config only: the workers measure
    # model facts from config files), so that cpu-demo's plan can be shown.
    demo = tmp / "data" / "models" / "tiny-chat"
    demo.mkdir(parents=True)
    shutil.copy(REPO / "tests/fixtures/models/Qwen2.5-1.5B-Instruct/config.json", demo)
    try:
        procs = []
        for name, (address, gpus) in HOSTS.items():
            p = worker(name, address, env.env, env.tmp / "logs", SAGELLM_MOCK_GPUS=gpus)
            env.procs[f"worker-{name}"] = p.start()
            procs.append(name)
        env.start_beat()
        settings = Settings.from_env({k: v for k, v in env.env.items() if k.startswith("SAGELLM_")})
        app = create_app(settings)
        api = ApiServer(app)
        wait_until(
            lambda: {h.name for h in env.cluster.registry.hosts() if h.up} >= set(procs),
            60,
            what="both workers' heartbeats",
        )
    except BaseException:
        env.close()
        raise
    try:
        yield Stack(env, api, app, tmp)
    finally:
        api.close()
        env.close()


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Any]:
    """One headless Chromium for the module, 1280x800, with its network log on."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM) or CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(executable_path=shutil.which(CHROMEDRIVER) or CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    set_viewport(driver, *VIEWPORT)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        drain_network_log(driver, stack)
        driver.quit()


def set_viewport(driver: Any, width: int, height: int) -> None:
    """An exact viewport (screenshots are this size), as a device would have."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 700},
    )


def drain_network_log(driver: Any, stack: Stack) -> None:
    """Move the URLs of every request the pages made (Chromium's performance log) into
    ``stack.urls_seen``."""
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            stack.urls_seen.append(message["params"]["request"]["url"])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, keep what the browser showed (a screenshot and the page's HTML)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    driver = getattr(item, "funcargs", {}).get("browser")
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.when == "call" and report.failed and driver is not None and stack is not None:
        where = stack.tmp / f"failed-{item.name}"
        driver.save_screenshot(str(where.with_suffix(".png")))
        where.with_suffix(".html").write_text(driver.page_source)
        report.sections.append(("browser", f"screenshot and HTML: {where}.png/.html"))
