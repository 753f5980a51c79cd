"""The dashboard, used as a person would, in real Chromium against a real stack.

The tests share one stack and one browser and run in file order (see ``conftest``):
sign in; read the GPU bars of a known layout; start an engine from the form and see it
reach RUNNING in the table without a reload; see why a form does not fit; stop with
drain from the engine's page; apply a preset and watch each engine to RUNNING, and a
broken one roll back; read a failed engine's failure and log; the gateway's numbers;
phone width; a DOWN host and its LOST engines; and, over all of it, that the pages
asked nothing of any host but the API.

Presets: the tests apply a small preset of stand-in engines (``tests/fakes/vllm``,
ready in well under a second) pasted on the presets page, not ``cpu-demo``, whose
real transformers and sentence-transformers engines take tens of seconds to load on
2 cores; ``cpu-demo``'s page and plan are still opened and checked.

Screenshots of each page at 1280x800 go to ``docs/screenshots/`` when
``SAGELLM_UPDATE_SCREENSHOTS=1`` (or when that folder is missing), else to a temp dir.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from app.core.models import EngineState
from app.core.spec import EngineSpec
from app.services.engines import start_engine, wait_for_state
from tests.browser.conftest import (
    INSTALL_HINT,
    TOKEN,
    VIEWPORT,
    Stack,
    drain_network_log,
    set_viewport,
)
from tests.integration.harness import wait_until

pytest.importorskip(
    "selenium", reason=f"selenium is not installed (pip install -e '.[test]'); {INSTALL_HINT}"
)
from selenium.common.exceptions import (
    NoAlertPresentException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

pytestmark = pytest.mark.integration
S = EngineState
MIB_PER_GB = 1024

GOOD_PRESET = """\
version: 1
name: ui-demo
description: two stand-in chat engines
engines:
  - name: chat
    kind: llm
    model: org/Chat-0.5B
    served_model_name: ui-chat
    required_memory_gb: 4
    host: gpu-a
  - name: chat-2
    kind: llm
    model: org/Chat2-0.5B
    served_model_name: ui-chat-2
    required_memory_gb: 4
    host: gpu-a
"""
BROKEN_PRESET = """\
version: 1
name: ui-broken
engines:
  - name: good
    model: org/Good-0.5B
    served_model_name: ui-good
    required_memory_gb: 3
    host: gpu-a
  - name: bad
    model: org/Tiny-Instrcut-0.5B
    served_model_name: ui-bad
    required_memory_gb: 3
    host: gpu-a
"""


# ---------------------------------------------------------------------------- helpers


def until(
    driver: WebDriver, check: Callable[[WebDriver], Any], what: str, timeout: float = 20
) -> Any:
    """Wait for ``check`` (no fixed sleeps); stale elements (a poll swapped them) retry."""
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    )
    return wait.until(check, message=f"waiting for {what}")


def find(driver: WebDriver, css: str) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, css)


def text(driver: WebDriver, css: str) -> str:
    found = find(driver, css)
    return found[0].text if found else ""


def open_page(driver: WebDriver, stack: Stack, path: str) -> None:
    driver.get(stack.url + path)
    until(driver, lambda d: d.execute_script("return document.readyState") == "complete", path)


def accept_confirm(driver: WebDriver) -> None:
    def alert(d: WebDriver) -> Any:
        try:
            return d.switch_to.alert
        except NoAlertPresentException:
            return False

    until(driver, alert, "the confirmation", 5).accept()


def screenshot(driver: WebDriver, stack: Stack, name: str) -> None:
    """A 1280x800 PNG of the page as it is now."""
    assert driver.execute_script("return [innerWidth, innerHeight]") == list(VIEWPORT)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(stack.screenshot_path(name)))


def row_state(driver: WebDriver, engine_id: str) -> str:
    found = find(driver, f'#engine-table tr[data-engine="{engine_id}"]')
    return found[0].get_attribute("data-state") or "" if found else ""


def start_form(driver: WebDriver, stack: Stack) -> WebElement:
    """The engines page with its start form open."""
    open_page(driver, stack, "/ui/engines")
    if not driver.find_element(By.ID, "start").get_attribute("open"):
        driver.find_element(By.CSS_SELECTOR, "details#start > summary").click()
    return driver.find_element(By.ID, "start-form")


def fill(form: WebElement, name: str, value: str) -> None:
    box = form.find_element(By.NAME, name)
    box.clear()
    box.send_keys(value)


# ---------------------------------------------------------------------------- tests


def test_a_wrong_token_is_refused_and_the_right_one_signs_in(
    stack: Stack, browser: WebDriver
) -> None:
    open_page(browser, stack, "/ui/")
    until(browser, lambda d: find(d, "dialog#sign-in[open]"), "the sign-in dialog")
    assert find(browser, "#cluster .host") == []  # nothing shown without the token
    box = browser.find_element(By.ID, "token")
    box.send_keys("not-the-token")
    browser.find_element(By.ID, "sign-in-submit").click()
    until(browser, lambda d: "Wrong token" in text(d, "#sign-in-error"), "the refusal")
    assert find(browser, "dialog#sign-in[open]")

    box.clear()
    box.send_keys(TOKEN)
    browser.find_element(By.ID, "sign-in-submit").click()
    until(browser, lambda d: not find(d, "dialog#sign-in[open]"), "the dialog to close")
    until(browser, lambda d: len(find(d, "#cluster article.host")) == 2, "both hosts")
    # The data routes refuse a wrong token as /v1/management does; shells are public.
    bad = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{stack.url}/ui/data/engines", headers=bad).status_code == 401
    assert httpx.get(f"{stack.url}/ui/data/cluster").status_code == 401
    assert httpx.post(f"{stack.url}/ui/data/engines/x/stop", headers=bad).status_code == 401
    assert httpx.get(f"{stack.url}/ui/engines").status_code == 200


def test_the_cluster_page_shows_who_holds_each_gpu(stack: Stack, browser: WebDriver) -> None:
    spec = EngineSpec(
        model="org/Bars-1B", label="bars", required_memory_gb=8, host="gpu-a", gpu_ids=(0,)
    )
    rec = wait_for_state(
        stack.env.cluster, start_engine(stack.env.cluster, spec).id, [S.RUNNING], 30
    )
    assert rec.state is S.RUNNING, rec.last_error

    open_page(browser, stack, "/ui/")
    gpu = '#host-gpu-a .gpu[data-gpu="0"]'
    until(browser, lambda d: find(d, f'{gpu} li[data-engine="{rec.id}"]'), "the engine's segment")

    def mib(segment: str) -> int:
        return int(
            find(browser, f'{gpu} li[data-segment="{segment}"]')[0].get_attribute("data-mib") or -1
        )

    total = 80 * MIB_PER_GB
    assert find(browser, gpu)[0].get_attribute("data-total-mib") == str(total)
    assert mib("engine") == 8 * MIB_PER_GB
    assert mib("outside") == 10 * MIB_PER_GB
    assert mib("margin") == 1 * MIB_PER_GB  # SAGELLM_GPU_SAFETY_MARGIN_GB default
    assert mib("free") == total - (8 + 10 + 1) * MIB_PER_GB
    legend = " ".join(text(browser, gpu + " .legend").split())
    for shown in ("bars 8.0 GB", "outside 10.0 GB", "margin 1.0 GB", "free 61.0 GB"):
        assert shown in legend
    # the engine's part of the bar links to its page; the numbers are on hover too
    link = find(browser, f'{gpu} svg a[href$="/ui/engines/{rec.id}"] title')
    assert link and "8.0 GB" in (link[0].get_attribute("textContent") or "")
    other = '#host-gpu-a .gpu[data-gpu="1"]'
    assert text(browser, other + ' li[data-segment="free"]').endswith("23.0 GB")
    assert text(browser, "#host-gpu-a .badge") == "UP"


def test_an_engine_started_from_the_form_reaches_running_without_a_reload(
    stack: Stack, browser: WebDriver
) -> None:
    form = start_form(browser, stack)
    until(browser, lambda d: find(d, "#engine-table table"), "the table")
    browser.execute_script("window.__sameDocument = true")
    fill(form, "model", "org/Form-1B")
    fill(form, "served_model_name", "form-chat")
    fill(form, "label", "from-the-form")
    fill(form, "required_memory_gb", "6")
    fill(form, "host", "gpu-a")
    until(browser, lambda d: "host gpu-a" in text(d, '#plan [data-plan="fits"]'), "the dry run")
    screenshot(browser, stack, "start-form")

    browser.find_element(By.ID, "start-submit").click()
    until(browser, lambda d: find(d, "#start-result .acted a"), "the start's answer")
    engine_id = find(browser, "#start-result .acted a")[0].text
    until(browser, lambda d: row_state(d, engine_id) != "", "its row in the table")
    until(browser, lambda d: row_state(d, engine_id) == "RUNNING", "RUNNING in the table", 30)
    assert browser.execute_script("return window.__sameDocument") is True  # no reload
    row = find(browser, f'#engine-table tr[data-engine="{engine_id}"]')[0]
    assert "from-the-form" in row.text and "gpu-a" in row.text and "6.0 GB" in row.text
    assert "RUNNING" in row.find_element(By.CSS_SELECTOR, ".state").text  # text, not colour

    # filters: by state, then by kind
    browser.find_element(By.CSS_SELECTOR, "details#start > summary").click()
    Select(
        browser.find_element(By.CSS_SELECTOR, '#filters select[name="state"]')
    ).select_by_visible_text("FAILED")
    until(
        browser, lambda d: not find(d, f'#engine-table tr[data-engine="{engine_id}"]'), "the filter"
    )
    Select(
        browser.find_element(By.CSS_SELECTOR, '#filters select[name="state"]')
    ).select_by_visible_text("RUNNING")
    until(browser, lambda d: find(d, f'#engine-table tr[data-engine="{engine_id}"]'), "the filter")
    stack.engines["form"] = engine_id


def test_a_form_that_does_not_fit_shows_the_reasons(stack: Stack, browser: WebDriver) -> None:
    form = start_form(browser, stack)
    fill(form, "model", "org/Huge-70B")
    fill(form, "required_memory_gb", "500")
    until(browser, lambda d: find(d, '#plan [data-plan="refused"] .reasons li'), "the reasons")
    reasons = [li.text for li in find(browser, "#plan .reasons li")]
    assert any("host gpu-a, GPU 0" in r and "500.0 GB needed" in r for r in reasons), reasons
    assert any("host gpu-b, GPU 0" in r for r in reasons), reasons
    fill(form, "required_memory_gb", "")
    fill(form, "tensor_parallel", "0")
    until(
        browser,
        lambda d: "tensor_parallel" in text(d, '#plan [data-plan="refused"]'),
        "a field error",
    )


def test_stop_with_drain_from_the_engine_page(stack: Stack, browser: WebDriver) -> None:
    engine_id = stack.engines["form"]
    open_page(browser, stack, f"/ui/engines/{engine_id}")
    until(browser, lambda d: find(d, "#engine .state"), "the record")
    until(
        browser, lambda d: "vllm serve org/Form-1B" in text(d, "#logs #command"), "the command line"
    )
    assert "/v1/chat/completions" in text(browser, "#snippet-curl")
    assert '"model": "form-chat"' in text(browser, "#snippet-curl")
    screenshot(browser, stack, "engine")
    stop = browser.find_element(By.ID, "stop-drain")
    assert stop.tag_name == "button"  # a real button: keyboard-usable
    stop.click()
    accept_confirm(browser)
    until(browser, lambda d: "Stopping" in text(d, "#action-result"), "the stop's answer")
    until(browser, lambda d: text(d, "#engine .engine-head .state") == "STOPPED", "STOPPED", 30)
    until(browser, lambda d: "draining" in text(d, "#events"), "the drain in the timeline")
    assert find(browser, "#stop-drain") == []  # nothing left to stop


def test_a_preset_applies_with_live_progress_and_a_broken_one_rolls_back(
    stack: Stack, browser: WebDriver
) -> None:
    open_page(browser, stack, "/ui/presets")
    until(browser, lambda d: find(d, '#presets tr[data-preset="cpu-demo"]'), "the built-ins")
    screenshot(browser, stack, "presets")
    browser.find_element(By.CSS_SELECTOR, '#presets tr[data-preset="cpu-demo"] a').click()
    # cpu-demo's YAML and its plan: both engines on CPU (dry run, nothing started)
    plan = "#preset table.plan tr[data-engine-name={}][data-action=start]"
    until(browser, lambda d: find(d, plan.format("tiny-chat")), "cpu-demo's plan")
    assert find(browser, plan.format("minilm"))
    yaml_text = browser.find_element(By.CSS_SELECTOR, "#preset pre.yaml").get_attribute(
        "textContent"
    )
    assert "name: cpu-demo" in (yaml_text or "")
    screenshot(browser, stack, "preset")

    def apply(yaml_text: str) -> None:
        open_page(browser, stack, "/ui/presets")
        browser.find_element(By.CSS_SELECTOR, "details#paste > summary").click()
        box = browser.find_element(By.ID, "pasted-yaml")
        box.clear()
        browser.execute_script("arguments[0].value = arguments[1]", box, yaml_text)
        browser.find_element(By.ID, "pasted-plan-button").click()
        until(browser, lambda d: find(d, '#pasted-plan tr[data-action="start"]'), "the plan")
        browser.find_element(By.ID, "apply-button").click()
        accept_confirm(browser)

    apply(GOOD_PRESET)
    seen: dict[str, set[str]] = {"chat": set(), "chat-2": set()}

    def both_running(d: WebDriver) -> bool:
        for name in seen:
            rows = find(d, f'#preset-progress tr[data-engine-name="{name}"]')
            if rows:
                seen[name].add(rows[0].get_attribute("data-state") or "")
        return all("RUNNING" in states for states in seen.values())

    until(browser, both_running, "both engines RUNNING", 30)
    until(browser, lambda d: find(d, '#apply-result [data-applied="ok"]'), "the apply's answer")
    # Live progress: each engine was shown starting before it was RUNNING (the
    # stand-in takes STARTUP_DELAY_S to listen; the page polls every second).
    for name, states in seen.items():
        assert states & {"PENDING", "STARTING"}, (name, states)

    apply(BROKEN_PRESET)
    until(browser, lambda d: find(d, '#apply-result [data-applied="failed"]'), "the failure", 40)
    failed = text(browser, "#apply-result")
    assert "'bad'" in failed and "rolled back" in failed.lower(), failed
    until(
        browser,
        lambda d: text(d, '#preset-progress tr[data-engine-name="good"] .state') == "STOPPED",
        "the rollback to stop the good engine",
        30,
    )
    bad = find(browser, '#preset-progress tr[data-engine-name="bad"] a')[0]
    assert text(browser, '#preset-progress tr[data-engine-name="bad"] .state') == "FAILED"
    stack.engines["failed"] = bad.text


def test_a_failed_engine_shows_why_and_its_log(stack: Stack, browser: WebDriver) -> None:
    engine_id = stack.engines["failed"]
    open_page(browser, stack, "/ui/engines")
    until(browser, lambda d: row_state(d, engine_id) == "FAILED", "the FAILED row")
    assert "model_not_found" in text(browser, f'#engine-table tr[data-engine="{engine_id}"]')
    screenshot(browser, stack, "engines")
    browser.find_element(By.CSS_SELECTOR, f'#engine-table tr[data-engine="{engine_id}"] a').click()
    until(browser, lambda d: find(d, "#engine .failure"), "the failure")
    failure = text(browser, "#engine .failure")
    assert "model_not_found" in failure and "What to do" in failure, failure
    until(browser, lambda d: "RepositoryNotFoundError" in text(d, "#logs pre.log"), "the log tail")
    assert "failed" in text(browser, "#events")
    assert find(browser, "#restart")  # a FAILED engine may be restarted
    screenshot(browser, stack, "engine-failed")


def test_the_gateway_page_counts_requests(stack: Stack, browser: WebDriver) -> None:
    from app.ui import traffic

    traffic.HISTORY._every_s = 0.2  # a sample per poll, not one every 5 s
    body = {"model": "ui-chat", "messages": [{"role": "user", "content": "hi"}]}
    try:
        open_page(browser, stack, "/ui/gateway")
        model = '#gateway tr[data-model="ui-chat"]'
        until(browser, lambda d: find(d, model), "the model")
        assert "1/1 healthy" in text(browser, model)
        sent = 0

        def counted(d: WebDriver) -> bool:
            """Traffic in bursts between polls, until the chart has a few points."""
            nonlocal sent
            for _ in range(1 + sent % 4):
                r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=10)
                assert r.status_code == 200, r.text
                sent += 1
            d.execute_script("document.body.dispatchEvent(new CustomEvent('sagellm:changed'))")
            cells = find(d, model + " td.num")
            charts = find(d, "#gateway svg.chart[data-points]")
            points = int(charts[0].get_attribute("data-points") or 0) if charts else 0
            return points >= 6 and len(cells) > 2 and cells[2].text not in ("", "0.00")

        until(browser, counted, "requests/s and the chart", 15)
        screenshot(browser, stack, "gateway")
    finally:
        traffic.HISTORY._every_s = traffic.SAMPLE_EVERY_S


def test_pages_work_at_phone_width(stack: Stack, browser: WebDriver) -> None:
    set_viewport(browser, 390, 844)
    try:
        for path, ready in (("/ui/engines", "#engine-table table"), ("/ui/", "#cluster .host")):
            open_page(browser, stack, path)
            until(browser, lambda d, css=ready: find(d, css), path)
            wide = browser.execute_script(
                "return document.documentElement.scrollWidth - innerWidth"
            )
            assert wide <= 1, f"{path} scrolls sideways by {wide}px at phone width"
    finally:
        set_viewport(browser, *VIEWPORT)


def test_a_down_host_and_its_lost_engines_are_obvious(stack: Stack, browser: WebDriver) -> None:
    spec = EngineSpec(model="org/OnB-1B", label="on-b", required_memory_gb=4, host="gpu-b")
    rec = wait_for_state(
        stack.env.cluster, start_engine(stack.env.cluster, spec).id, [S.RUNNING], 30
    )
    assert rec.state is S.RUNNING, rec.last_error
    stack.env.procs["worker-gpu-b"].kill9()
    open_page(browser, stack, "/ui/")
    until(browser, lambda d: text(d, "#host-gpu-b .badge") == "DOWN", "gpu-b DOWN", 20)
    until(browser, lambda d: "1 LOST" in text(d, "#host-gpu-b header"), "its engine LOST", 20)
    assert find(browser, '#host-gpu-b rect.engine[data-state="LOST"]')
    assert "LOST" in text(browser, f'#host-gpu-b li[data-engine="{rec.id}"]')
    screenshot(browser, stack, "cluster")
    wait_until(lambda: stack.env.get(rec.id).state is S.LOST, 5, what="LOST in the registry")


def test_the_pages_asked_nothing_of_any_other_host_and_broke_no_rule(
    stack: Stack, browser: WebDriver
) -> None:
    drain_network_log(browser, stack)
    entries = browser.execute_script("return performance.getEntries().map(e => e.name)")
    api = urlsplit(stack.url).netloc
    foreign = [
        u
        for u in [*stack.urls_seen, *entries]
        if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).netloc != api
    ]
    assert len(stack.urls_seen) > 50  # the log did record the pages' requests
    assert foreign == []
    assert not [u for u in stack.urls_seen if urlsplit(u).scheme not in ("http", "data", "about")]
    # No Content-Security-Policy violation, no script error, no htmx error on any page.
    console = [e["message"] for e in browser.get_log("browser")]
    assert any("session" in m and "401" in m for m in console)  # the log is read: the wrong token
    assert not [
        m for m in console if "Content Security Policy" in m or "Uncaught" in m or "htmx:" in m
    ], console
