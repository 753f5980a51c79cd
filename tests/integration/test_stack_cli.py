"""The CLI against the real stack started by `sagellm up`: gunicorn API, worker, beat
and embedded Redis as real processes, real engines on CPU. And how `up` ends: `down`
or Ctrl-C, with and without SAGELLM_ADMIN_TOKEN, leave no process of ours running."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from app.dev import demo_model
from app.dev.demo_model import demo_llm_is_built
from app.dev.redis_server import free_port
from app.services.preset_files import demo_llm_dir
from tests.integration.harness import BIN, Proc, base_env, wait_until

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    tmp: Path

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "sagellm"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def api(self, path: str) -> object:
        return httpx.get(f"{self.url}{path}", headers=_auth(self.env), timeout=10).json()

    def engines(self, preset: str | None = None) -> list[dict[str, object]]:
        out = self.api("/v1/management/engines")
        assert isinstance(out, list)
        return [e for e in out if preset is None or e["spec"]["preset"] == preset]

    def reservations(self) -> list[object]:
        status = self.api("/v1/management/status")
        assert isinstance(status, dict)
        return list(status["reservations"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    url = f"http://127.0.0.1:{free_port()}"
    env = base_env(
        "redis://unused",
        tmp / "data",
        SAGELLM_API_URL=url,
        SAGELLM_MOCK_GPUS="1x24",
        SAGELLM_MAX_RESTARTS="0",
        SAGELLM_HOST_NAME="cpu1",
        SAGELLM_PORT_RANGE="18300-18349",
    )
    env.pop("SAGELLM_REDIS_URL")  # up starts its embedded Redis
    up = _start_up(env, tmp)
    ours: set[psutil.Process] = set()
    try:
        yield Stack(url, env, tmp)
        ours = _our_processes(up, env)
    finally:
        down = _down(env)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "sagellm stack stopped" in down.stdout
        assert not up.alive(), up.output()[-3000:]
        up.stop()
        _assert_all_gone(ours, env, up)


def _auth(env: dict[str, str]) -> dict[str, str]:
    """The admin token `up` was given, else the one it generated on this machine."""
    token = env.get("SAGELLM_ADMIN_TOKEN") or (
        (Path(env["SAGELLM_DATA_DIR"]) / "admin-token").read_text().strip()
    )
    return {"Authorization": f"Bearer {token}"}


def _start_up(env: dict[str, str], tmp: Path) -> Proc:
    """`sagellm up` in a process group of its own, as a shell's job control runs it."""
    up = Proc("up", [str(BIN / "sagellm"), "up"], env, tmp / "logs")
    up.log.parent.mkdir(parents=True, exist_ok=True)
    with up.log.open("ab") as out:
        up.proc = subprocess.Popen(
            up.argv, env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0
        )
    url = env["SAGELLM_API_URL"]
    try:
        wait_until(
            lambda: up.alive() and _get(f"{url}/v1/management/hosts", env),
            90,
            interval=0.5,
            what="the stack to come up",
        )
    except AssertionError:
        os.killpg(up.pid, signal.SIGKILL)
        for p in _by_data_dir(env):
            p.kill()
        raise AssertionError(f"the stack did not come up; log:\n{up.output()}") from None
    return up


def _down(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "sagellm"), "down"], env=env, capture_output=True, text=True, timeout=120
    )


def _our_processes(up: Proc, env: dict[str, str]) -> set[psutil.Process]:
    """Everything `up` started (Redis, worker, beat, gunicorn and its workers, engines
    and their children), and any process that carries this stack's data folder."""
    procs = set(psutil.Process(up.pid).children(recursive=True))
    procs |= _by_data_dir(env)
    names = " ".join(" ".join(p.cmdline()) for p in procs if p.is_running())
    for part in ("redis-server", "worker", "beat", "gunicorn"):
        assert part in names, (part, names)
    return procs


def _by_data_dir(env: dict[str, str]) -> set[psutil.Process]:
    found = set()
    for p in psutil.process_iter():
        try:
            if p.environ().get("SAGELLM_DATA_DIR") == env["SAGELLM_DATA_DIR"]:
                found.add(p)
        except (psutil.Error, OSError):
            continue
    return found


def _assert_all_gone(ours: set[psutil.Process], env: dict[str, str], up: Proc) -> None:
    def alive() -> list[str]:
        left = {
            p
            for p in ours | _by_data_dir(env)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        }
        return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in left]

    try:
        wait_until(lambda: not alive(), 10, interval=0.3, what="nothing of ours running")
    except AssertionError:
        left = alive()
        for p in ours | _by_data_dir(env):
            with contextlib.suppress(psutil.Error):
                p.kill()
        raise AssertionError(f"left running: {left}\nup log:\n{up.output()[-3000:]}") from None


def _get(url: str, env: dict[str, str]) -> object:
    try:
        r = httpx.get(url, headers=_auth(env), timeout=2)
        return r.json() if r.status_code == 200 and r.json() else None
    except (httpx.HTTPError, OSError):
        return None


def test_cpu_demo_dry_run_reserves_nothing(stack: Stack) -> None:
    r = stack.cli("preset", "apply", "-n", "cpu-demo", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tiny-chat" in r.stdout and "minilm" in r.stdout and "cpu1" in r.stdout
    assert stack.reservations() == [] and stack.engines() == []


def test_cpu_demo_apply_runs_real_engines_and_again_starts_nothing(stack: Stack) -> None:
    # `up` built the chat model (in a process of its own) before its API answered.
    assert "building the tiny cpu-demo chat model" in (stack.tmp / "logs" / "up.log").read_text()
    r = stack.cli("preset", "apply", "-n", "cpu-demo", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    engines = stack.engines("cpu-demo")
    assert sorted(e["spec"]["preset_engine"] for e in engines) == ["minilm", "tiny-chat"]
    assert all(e["state"] == "RUNNING" for e in engines)
    # the production server path (gunicorn) routes to them
    out = httpx.post(
        f"{stack.url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hi"}, timeout=60
    ).json()
    assert len(out["data"][0]["embedding"]) == 384
    chat = httpx.post(
        f"{stack.url}/v1/chat/completions",
        timeout=60,
        json={
            "model": "tiny-chat",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
    again = stack.cli("preset", "apply", "-n", "cpu-demo", "--yes")
    assert again.returncode == 0
    assert "already running" in again.stdout
    assert len(stack.engines("cpu-demo")) == 2


def test_preset_that_cannot_fit_starts_nothing_and_says_why(stack: Stack) -> None:
    before = stack.reservations()
    f = stack.tmp / "too-big.yaml"
    f.write_text(
        "version: 1\nname: too-big\nengines:\n"
        "  - {name: small, kind: embedding, model: ${SAGELLM_MINILM_PATH}, "
        "served_model_name: small-emb}\n"
        "  - {name: huge, model: org/Huge-70B, required_memory_gb: 40}\n"
    )
    r = stack.cli("preset", "apply", "--file", str(f), "--yes")
    assert r.returncode != 0
    assert "host cpu1, GPU 0:" in r.stdout + r.stderr and "40.0 GB needed" in r.stdout + r.stderr
    assert stack.engines("too-big") == []
    assert stack.reservations() == before


def test_engine_that_fails_at_start_rolls_back_the_others(stack: Stack) -> None:
    before = stack.reservations()
    # A directory that exists but holds no model: admitted, fails when it loads (a
    # path that exists nowhere is refused at admission, before anything starts).
    (stack.tmp / "not-a-model").mkdir(exist_ok=True)
    f = stack.tmp / "half-broken.yaml"
    f.write_text(
        "version: 1\nname: half-broken\nengines:\n"
        "  - {name: good, kind: embedding, model: ${SAGELLM_MINILM_PATH}, "
        "served_model_name: good-emb}\n"
        f"  - {{name: broken, runtime: transformers, use_gpu: false, "
        f"model: {stack.tmp}/not-a-model}}\n"
    )
    r = stack.cli("preset", "apply", "--file", str(f), "--yes", "--timeout", "240")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "broken" in out and "rolled back" in out
    states = {e["spec"]["preset_engine"]: e["state"] for e in stack.engines("half-broken")}
    assert states["broken"] == "FAILED"
    assert states["good"] in ("STOPPING", "STOPPED")
    wait_until(lambda: stack.reservations() == before, 30, what="rollback released everything")
    assert all(
        e["state"] == "STOPPED"
        for e in stack.engines("half-broken")
        if e["spec"]["preset_engine"] == "good"
    )


def test_a_model_path_that_exists_nowhere_is_refused_before_anything_starts(
    stack: Stack,
) -> None:
    before = stack.reservations()
    f = stack.tmp / "typo.yaml"
    f.write_text(
        "version: 1\nname: typo\nengines:\n"
        "  - {name: good, kind: embedding, model: ${SAGELLM_MINILM_PATH}, "
        "served_model_name: typo-emb}\n"
        f"  - {{name: typo, runtime: transformers, use_gpu: false, "
        f"model: {stack.tmp}/no-such-model}}\n"
    )
    r = stack.cli("preset", "apply", "--file", str(f), "--yes", "--timeout", "60")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "no-such-model" in out and "model" in out
    assert stack.engines("typo") == []
    assert stack.reservations() == before


def test_bad_input_through_the_cli_reserves_nothing(stack: Stack) -> None:
    before = stack.reservations()
    for args in (
        ["engine", "start", "m; rm -rf /", "--memory-gb", "1"],
        ["engine", "start", "m", "--tp", "0"],
        ["engine", "start", "m", "--memory-gb", "1", "--port", "9999"],
        ["preset", "apply", "-n", "no-such-preset", "--yes"],
    ):
        r = stack.cli(*args)
        assert r.returncode != 0, args
        assert r.stderr.strip(), args
    assert stack.reservations() == before


def test_up_generated_an_admin_token_that_the_api_requires(stack: Stack) -> None:
    token_file = Path(stack.env["SAGELLM_DATA_DIR"]) / "admin-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    log = (stack.tmp / "logs" / "up.log").read_text()
    assert log.count(token) == 1  # printed once, at its creation
    assert httpx.get(f"{stack.url}/v1/management/engines", timeout=10).status_code == 401
    r = stack.cli("status")  # the CLI on this machine finds the token by itself
    assert r.returncode == 0, r.stdout + r.stderr


def test_logs_follow_a_real_engine_until_it_is_stopped_by_its_label(stack: Stack) -> None:
    # tiny-chat runs since the cpu-demo apply above; this test stops it, so it comes last
    out = stack.tmp / "follow.out"
    err = stack.tmp / "follow.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        follow = subprocess.Popen(
            [str(BIN / "sagellm"), "engine", "logs", "tiny-chat", "--tail", "5", "-f"],
            env=stack.env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(lambda: out.read_text().strip(), 30, what="the log's last lines")
            assert follow.poll() is None  # still following
            stop = stack.cli("engine", "stop", "tiny-chat")
            assert stop.returncode == 0, stop.stdout + stop.stderr
            assert ": STOPPED" in stop.stdout.splitlines()[-1], stop.stdout
            assert follow.wait(30) == 0, err.read_text()
        finally:
            if follow.poll() is None:
                follow.kill()
    assert len(out.read_text().splitlines()) >= 1
    assert "STOPPED" in err.read_text()


def _kill_what_is_left(up: Proc, env: dict[str, str]) -> None:
    """A failed test's leftovers: `up`'s process group and anything of its data dir."""
    if up.alive():
        os.killpg(up.pid, signal.SIGKILL)
    for p in _by_data_dir(env):
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.mark.parametrize(
    ("token", "how"),
    [("set", "ctrl-c"), ("generated", "ctrl-c"), ("set", "down")],
)
def test_up_stops_everything_it_started(
    tmp_path: Path, tiny_llm_path: Path, token: str, how: str
) -> None:
    # The cpu-demo model as an earlier `up` left it (the `stack` fixture's `up` builds
    # one): this `up` does not build it again.
    shutil.copytree(tiny_llm_path, demo_llm_dir(tmp_path / "data"))
    url = f"http://127.0.0.1:{free_port()}"
    env = base_env(
        "redis://unused",
        tmp_path / "data",
        SAGELLM_API_URL=url,
        SAGELLM_MOCK_GPUS="1x24",
        SAGELLM_MAX_RESTARTS="0",
        SAGELLM_HOST_NAME="cpu2",
        SAGELLM_PORT_RANGE="18350-18399",
        SAGELLM_STOP_GRACE_S="3",
    )
    env.pop("SAGELLM_REDIS_URL")
    if token == "set":
        env["SAGELLM_ADMIN_TOKEN"] = "tok-" + os.urandom(8).hex()
    up = _start_up(env, tmp_path)
    try:
        assert "building the tiny cpu-demo chat model" not in up.output()
        r = subprocess.run(
            [str(BIN / "sagellm"), "engine", "start", "org/Fake-1B", "--memory-gb", "8",
             "--timeout", "60"],
            env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        ours = _our_processes(up, env)
        assert any("vllm" in " ".join(p.cmdline()) for p in ours)
        if how == "ctrl-c":
            os.killpg(up.pid, signal.SIGINT)  # what a terminal sends to its job
            assert up.proc is not None
            up.proc.wait(90)
        else:
            down = _down(env)
            assert down.returncode == 0, down.stdout + down.stderr
            assert "sagellm stack stopped" in down.stdout
        assert not up.alive()
        _assert_all_gone(ours, env, up)
        assert "Traceback" not in up.output(), up.output()[-3000:]
    finally:
        _kill_what_is_left(up, env)


def test_ctrl_c_while_up_builds_the_demo_model_stops_all_and_leaves_no_model(
    tmp_path: Path,
) -> None:
    env = base_env(
        "redis://unused",
        tmp_path / "data",
        SAGELLM_API_URL=f"http://127.0.0.1:{free_port()}",
        SAGELLM_MOCK_GPUS="1x24",
        SAGELLM_HOST_NAME="cpu3",
        SAGELLM_PORT_RANGE="18350-18399",
        SAGELLM_ADMIN_TOKEN="tok-" + os.urandom(8).hex(),
    )
    env.pop("SAGELLM_REDIS_URL")
    up = Proc("up", [str(BIN / "sagellm"), "up"], env, tmp_path / "logs")
    up.log.parent.mkdir(parents=True)
    with up.log.open("ab") as out:
        up.proc = subprocess.Popen(
            up.argv, env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0
        )
    try:
        # The model builds (torch's import alone takes seconds) while beat boots.
        wait_until(lambda: "beat started" in up.output(), 60, what="beat started")
        ours = set(psutil.Process(up.pid).children(recursive=True))
        assert any("app.dev.demo_model" in " ".join(p.cmdline()) for p in ours), ours
        os.killpg(up.pid, signal.SIGINT)
        assert up.proc.wait(60) == 0, up.output()
        _assert_all_gone(ours, env, up)
        assert "api started" not in up.output()
        assert "Traceback" not in up.output(), up.output()
        assert not demo_llm_is_built(demo_llm_dir(tmp_path / "data"))
    finally:
        _kill_what_is_left(up, env)


def test_a_demo_model_build_cut_short_leaves_nothing_that_looks_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_build(path: Path) -> Path:
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        (path / "tokenizer_config.json").write_text("{}")
        raise KeyboardInterrupt  # cut short before the weights and tokenizer are written

    monkeypatch.setattr(demo_model, "build_tiny_llm", half_build)
    path = demo_llm_dir(tmp_path / "data")
    with pytest.raises(KeyboardInterrupt):
        demo_model.ensure_demo_llm(path)
    assert not demo_llm_is_built(path)
