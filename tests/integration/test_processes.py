"""Real engine processes: the fake ``vllm`` started from the vLLM runtime's plan, probed
over HTTP, found again by its tag, stopped as a whole process group."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from app.core.inventory_spec import mock_uuid
from app.core.models import EngineRecord, GpuAssignment
from app.core.spec import EngineSpec
from app.state.ledger import port_is_bindable
from workers.host import process_tree, processes
from workers.host.processes import NotOurProcess, SpawnedProcess
from workers.runtimes import get_runtime
from workers.runtimes.base import LaunchPlan

pytestmark = pytest.mark.integration

FAKES = Path(__file__).resolve().parents[1] / "fakes"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A bindable port below the ephemeral range: a port the kernel handed out with
    bind(0) could be taken as the source port of some connection before the engine binds.
    Random, so that concurrent test runs rarely meet."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        if port_is_bindable("127.0.0.1", port):
            return port
    raise AssertionError("no free port in 20000-30000")


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def fake_vllm_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """PATH with the fake vllm first (and this venv's python3 for its shebang); returns
    the file the fake records its starts in."""
    path = os.pathsep.join([str(FAKES), str(VENV_BIN), os.environ.get("PATH", "")])
    monkeypatch.setenv("PATH", path)
    record = tmp_path / "starts.jsonl"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    return record


Cleanup = list[tuple[int, float]]


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    """(pid, create time) of session leaders whose group is killed after the test,
    whatever happened; only while the pid is still the process the test started."""
    started: Cleanup = []
    yield started
    for pid, created in started:
        try:
            processes.stop(pid, created, grace_s=0.5)  # also sweeps orphaned workers
        except NotOurProcess:  # the untagged sleepers tests start themselves
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def strays() -> Iterator[list[psutil.Process]]:
    """Processes SIGKILLed after the test if they still run (psutil checks their
    identity first), so a failing test leaves no renamed worker behind."""
    procs: list[psutil.Process] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def engine(engine_id: str, *, model: str = "Qwen/Qwen2.5-1.5B-Instruct") -> EngineRecord:
    return EngineRecord(
        id=engine_id,
        spec=EngineSpec(model=model, served_model_name="qwen", tensor_parallel=2),
        host="a",
        address="127.0.0.1",
        port=free_port(),
        gpus=[GpuAssignment(i, mock_uuid("a", i), 10_000) for i in range(2)],
        launch={"gpu_memory_utilization": 0.25, "max_model_len": 4096},
    )


def start(rec: EngineRecord, log: Path, cleanup: Cleanup) -> SpawnedProcess:
    proc = processes.spawn(get_runtime("vllm").build(rec), log)
    cleanup.append((proc.pid, proc.create_time))
    return proc


def wait_ready(rec: EngineRecord, proc: SpawnedProcess, log: Path, timeout_s: float = 20) -> None:
    runtime = get_runtime("vllm")
    details: list[str] = []
    with httpx.Client() as client:

        def ready() -> bool:
            if not processes.is_alive(proc.pid, proc.create_time):
                raise AssertionError(f"engine exited; log:\n{processes.tail_log(log)}")
            r = runtime.probe(rec, client, timeout_s=1.0)
            details.append(r.detail)
            return r.ready

        wait_until(ready, timeout_s, f"readiness (last: {details[-1:]})")


def spawn_untagged_sleeper() -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "SAGELLM_ENGINE_ID"}
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True
    )


def test_fake_vllm_starts_pinned_and_tagged_and_answers_readiness(
    fake_vllm_env: Path, tmp_path: Path, cleanup: Cleanup
) -> None:
    rec = engine("eng-ready", model="/models/my model")  # a space: no shell in between
    proc = start(rec, tmp_path / "eng.log", cleanup)
    assert processes.is_alive(proc.pid, proc.create_time)

    wait_ready(rec, proc, tmp_path / "eng.log")

    (started,) = [json.loads(line) for line in fake_vllm_env.read_text().splitlines()]
    assert started["pid"] == proc.pid  # executed directly: no shell process in between
    assert started["argv"][:2] == ["serve", "/models/my model"]
    argv = started["argv"]
    assert argv[argv.index("--port") + 1] == str(rec.port)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.250"
    assert argv[argv.index("--max-model-len") + 1] == "4096"
    assert started["env"] == {
        "CUDA_VISIBLE_DEVICES": f"{mock_uuid('a', 0)},{mock_uuid('a', 1)}",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "SAGELLM_ENGINE_ID": "eng-ready",
    }
    # Its own session and process group: worker signals do not reach it.
    assert os.getsid(proc.pid) == proc.pid == os.getpgid(proc.pid)
    assert "serving 'qwen'" in processes.tail_log(tmp_path / "eng.log")


def test_probe_says_not_listening_before_the_engine_binds(
    fake_vllm_env: Path, tmp_path: Path, cleanup: Cleanup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_STARTUP_DELAY", "1.5")
    rec = engine("eng-slow")
    proc = start(rec, tmp_path / "eng.log", cleanup)
    with httpx.Client() as client:
        first = get_runtime("vllm").probe(rec, client, timeout_s=1.0)
    assert (first.ready, first.detail) == (False, "not listening yet")
    wait_ready(rec, proc, tmp_path / "eng.log")


def test_find_tagged_processes_finds_engine_leaders_only(
    fake_vllm_env: Path, tmp_path: Path, cleanup: Cleanup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_WORKERS", "2")  # tagged children, like TP workers
    rec = engine("eng-found")
    proc = start(rec, tmp_path / "eng.log", cleanup)
    sleeper = spawn_untagged_sleeper()
    cleanup.append((sleeper.pid, psutil.Process(sleeper.pid).create_time()))
    wait_ready(rec, proc, tmp_path / "eng.log")
    wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2, 10, "2 workers")

    found = processes.find_tagged_processes()

    assert "eng-found" in found
    top = found["eng-found"]
    assert (top.pid, top.session_leader) == (proc.pid, True)  # not one of its workers
    assert top.create_time == pytest.approx(proc.create_time, abs=1e-2)
    cmd = list(top.cmdline)  # [python3, .../fakes/vllm, serve, ...]: a script's shebang
    assert cmd[cmd.index("serve") + 1] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert rec.port in top.ports
    assert sleeper.pid not in {t.pid for t in found.values()}


def test_stop_terminates_the_whole_group_and_is_idempotent(
    fake_vllm_env: Path, tmp_path: Path, cleanup: Cleanup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_WORKERS", "2")
    rec = engine("eng-stop")
    proc = start(rec, tmp_path / "eng.log", cleanup)
    wait_ready(rec, proc, tmp_path / "eng.log")
    wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2, 10, "2 workers")
    workers = psutil.Process(proc.pid).children()

    began = time.monotonic()
    result = processes.stop(proc.pid, proc.create_time, grace_s=10, engine_id="eng-stop")

    assert time.monotonic() - began < 10
    assert result == processes.StopResult(exited=True, killed=False, exit_code=0)
    assert not processes.is_alive(proc.pid, proc.create_time)
    for w in workers:
        assert not processes.is_alive(w.pid, w.create_time())
    assert "eng-stop" not in processes.find_tagged_processes()
    again = processes.stop(proc.pid, proc.create_time, grace_s=10, engine_id="eng-stop")
    assert again == processes.StopResult(exited=True, killed=False, exit_code=0)


def test_stop_after_leader_crash_sweeps_its_orphaned_workers(
    fake_vllm_env: Path, tmp_path: Path, cleanup: Cleanup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_WORKERS", "2")
    rec = engine("eng-orphans")
    proc = start(rec, tmp_path / "eng.log", cleanup)
    wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2, 10, "2 workers")
    workers = psutil.Process(proc.pid).children()
    os.kill(proc.pid, signal.SIGKILL)  # the leader alone dies; its workers live on
    wait_until(lambda: processes.exit_code(proc.pid) is not None, 10, "leader reaped")
    assert all(w.is_running() for w in workers)
    orphan = processes.find_tagged_processes()["eng-orphans"]
    assert orphan.pid in {w.pid for w in workers}
    assert not orphan.session_leader

    result = processes.stop(proc.pid, proc.create_time, grace_s=5, engine_id="eng-orphans")

    assert result == processes.StopResult(exited=True, killed=False, exit_code=-signal.SIGKILL)
    for w in workers:
        assert not processes.is_alive(w.pid, w.create_time())
    assert "eng-orphans" not in processes.find_tagged_processes()


def test_stop_kills_a_process_that_ignores_sigterm_after_the_grace(
    tmp_path: Path, cleanup: Cleanup
) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('sigterm', 'ignored', flush=True)\n"
        "time.sleep(60)\n"
    )
    plan = LaunchPlan([sys.executable, "-c", code], {"SAGELLM_ENGINE_ID": "eng-stubborn"})
    log = tmp_path / "stubborn.log"
    proc = processes.spawn(plan, log)
    cleanup.append((proc.pid, proc.create_time))
    wait_until(lambda: "sigterm ignored" in processes.tail_log(log), 10, "handler installed")

    began = time.monotonic()
    result = processes.stop(proc.pid, proc.create_time, grace_s=0.5)
    took = time.monotonic() - began

    assert result == processes.StopResult(exited=True, killed=True, exit_code=-signal.SIGKILL)
    assert 0.5 <= took < 5
    assert not processes.is_alive(proc.pid, proc.create_time)


def test_exit_at_start_is_reaped_with_its_exit_code(
    fake_vllm_env: Path, tmp_path: Path, cleanup: Cleanup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_EXIT_AT_START", "3")
    log = tmp_path / "eng.log"
    proc = start(engine("eng-crash"), log, cleanup)

    reaped: dict[int, int] = {}
    wait_until(lambda: bool(reaped.update(processes.reap_children()) or reaped), 10, "exit")

    assert reaped == {proc.pid: 3}
    assert processes.exit_code(proc.pid) == 3
    assert not processes.is_alive(proc.pid, proc.create_time)
    with pytest.raises(ChildProcessError):  # reaped: no zombie left behind
        os.waitpid(proc.pid, os.WNOHANG)
    assert "failing at start as asked (exit 3)" in processes.tail_log(log)
    assert processes.stop(proc.pid, proc.create_time, grace_s=1).exited


def test_is_alive_rejects_a_reused_pid() -> None:
    me = psutil.Process()
    assert processes.is_alive(me.pid, me.create_time())
    assert not processes.is_alive(me.pid, me.create_time() - 5.0)


def test_untagged_process_is_never_signalled_without_its_identity(cleanup: Cleanup) -> None:
    """An unrelated process (no tag, its own session, with a child in it) is neither
    stopped nor swept when the caller has no create time or a wrong one."""
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SAGELLM_ENGINE_ID"}
    sleeper = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    created = psutil.Process(sleeper.pid).create_time()
    cleanup.append((sleeper.pid, created))
    wait_until(lambda: len(psutil.Process(sleeper.pid).children()) == 1, 10, "its child")
    (child,) = psutil.Process(sleeper.pid).children()
    wrong = created - 5.0  # as if the pid had been reused since the record was made

    with pytest.raises(NotOurProcess, match="not signalled"):
        processes.stop(sleeper.pid, None, grace_s=0.5)
    assert processes.stop(sleeper.pid, wrong, grace_s=0.5) == processes.StopResult(
        exited=True, killed=False, exit_code=None
    )
    assert processes.sweep_session(sleeper.pid, wrong, grace_s=0.5) == 0
    assert processes.sweep_session(sleeper.pid, None, grace_s=0.5) == 0
    assert process_tree.engine_tree(sleeper.pid, wrong) == []
    assert not bool(process_tree.engine_tree(sleeper.pid, wrong))

    # Its leader gone, the child left in its session is still not ours: without a
    # create time, only a tag would make it so.
    os.kill(sleeper.pid, signal.SIGKILL)
    sleeper.wait()
    assert processes.sweep_session(sleeper.pid, None, grace_s=0.5) == 0
    assert processes.stop(sleeper.pid, None, grace_s=0.5).exited

    time.sleep(0.2)
    assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    child.kill()


def test_stop_refuses_another_engines_process(
    fake_vllm_env: Path, tmp_path: Path, cleanup: Cleanup
) -> None:
    rec = engine("eng-other")
    proc = start(rec, tmp_path / "eng.log", cleanup)
    with pytest.raises(NotOurProcess, match="eng-other"):
        processes.stop(proc.pid, proc.create_time, grace_s=0.5, engine_id="eng-mine")
    assert processes.is_alive(proc.pid, proc.create_time)


def test_sweep_leaves_processes_tagged_for_another_engine(
    fake_vllm_env: Path, tmp_path: Path, cleanup: Cleanup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A readable tag that differs is proof against ownership, even in the session."""
    monkeypatch.setenv("FAKE_VLLM_WORKERS", "2")
    proc = start(engine("eng-other"), tmp_path / "eng.log", cleanup)
    wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2, 10, "2 workers")
    workers = psutil.Process(proc.pid).children()
    os.kill(proc.pid, signal.SIGKILL)
    wait_until(lambda: processes.exit_code(proc.pid) is not None, 10, "leader reaped")

    assert processes.sweep_session(proc.pid, proc.create_time, 0.5, engine_id="eng-mine") == 0
    result = processes.stop(proc.pid, proc.create_time, grace_s=0.5, engine_id="eng-mine")

    assert result.exited and not result.killed
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert bool(process_tree.engine_tree(proc.pid, proc.create_time))  # still an engine's


# ------------------------------------------------- engines that rename their processes


def start_renamed(
    tmp_path: Path, engine_id: str, cleanup: Cleanup, strays: list[psutil.Process], *args: str
) -> tuple[SpawnedProcess, list[psutil.Process]]:
    """Spawn ``fakes/renamed_engine.py`` (workers renamed with setproctitle, as vLLM's)
    and return it with its workers once they have renamed themselves."""
    log = tmp_path / f"{engine_id}.log"
    plan = LaunchPlan(
        [sys.executable, str(FAKES / "renamed_engine.py"), *args],
        {"SAGELLM_ENGINE_ID": engine_id},
    )
    proc = processes.spawn(plan, log)
    cleanup.append((proc.pid, proc.create_time))
    wait_until(lambda: "ready" in processes.tail_log(log, 1), 15, f"{engine_id} ready")
    pids = [int(p) for p in processes.tail_log(log, 1).split()[1:]]
    workers = [psutil.Process(p) for p in pids]
    strays.extend(workers)
    for w in workers:
        assert os.getsid(w.pid) == proc.pid == os.getpgid(w.pid)
        assert w.cmdline()[0].startswith("VLLM::Worker_TP")
        assert untagged(w.pid)  # the premise: the rename wiped the tag
    return proc, workers


def untagged(pid: int) -> bool:
    return b"SAGELLM_ENGINE_ID" not in Path(f"/proc/{pid}/environ").read_bytes()


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def crash_leader(proc: SpawnedProcess) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # the leader alone dies; its workers live on
    wait_until(lambda: processes.exit_code(proc.pid) is not None, 10, "leader reaped")


def test_renamed_workers_of_a_crashed_leader_are_found_and_swept(
    tmp_path: Path, cleanup: Cleanup, strays: list[psutil.Process]
) -> None:
    proc, workers = start_renamed(tmp_path, "eng-renamed", cleanup, strays, "--workers", "2")
    tree = {p.pid for p in process_tree.engine_tree(proc.pid, proc.create_time)}
    assert tree == {proc.pid, *(w.pid for w in workers)}
    crash_leader(proc)
    assert all(not gone(w) for w in workers)
    # Untagged, they are invisible to the tag scan, but not to the session's.
    assert "eng-renamed" not in processes.find_tagged_processes()
    assert bool(process_tree.engine_tree(proc.pid, proc.create_time))
    assert {p.pid for p in process_tree.engine_tree(proc.pid, proc.create_time)} == {
        w.pid for w in workers
    }

    assert processes.sweep_session(proc.pid, proc.create_time, grace_s=5) == 2

    assert all(gone(w) for w in workers)
    assert not bool(process_tree.engine_tree(proc.pid, proc.create_time))
    assert process_tree.engine_tree(proc.pid, proc.create_time) == []
    assert processes.sweep_session(proc.pid, proc.create_time, grace_s=5) == 0


def test_stop_after_leader_crash_sweeps_renamed_workers(
    tmp_path: Path, cleanup: Cleanup, strays: list[psutil.Process]
) -> None:
    proc, workers = start_renamed(tmp_path, "eng-renamed", cleanup, strays, "--workers", "2")
    crash_leader(proc)

    result = processes.stop(proc.pid, proc.create_time, grace_s=5, engine_id="eng-renamed")

    assert result == processes.StopResult(exited=True, killed=False, exit_code=-signal.SIGKILL)
    assert [w.pid for w in workers if not gone(w)] == []


def test_sweep_does_nothing_while_the_leader_runs(
    tmp_path: Path, cleanup: Cleanup, strays: list[psutil.Process]
) -> None:
    proc, workers = start_renamed(tmp_path, "eng-running", cleanup, strays)
    assert processes.sweep_session(proc.pid, proc.create_time, grace_s=0.5) == 0
    assert processes.is_alive(proc.pid, proc.create_time)
    assert all(not gone(w) for w in workers)


def test_stop_stops_a_leader_that_renamed_itself_by_its_identity(
    tmp_path: Path, cleanup: Cleanup, strays: list[psutil.Process]
) -> None:
    proc, workers = start_renamed(
        tmp_path, "eng-self", cleanup, strays, "--workers", "1", "--rename-leader"
    )
    assert psutil.Process(proc.pid).cmdline()[0] == "VLLM::APIServer"
    assert untagged(proc.pid)
    with pytest.raises(NotOurProcess):  # neither identity nor tag: never signalled
        processes.stop(proc.pid, None, grace_s=0.5, engine_id="eng-self")
    assert processes.is_alive(proc.pid, proc.create_time)

    result = processes.stop(proc.pid, proc.create_time, grace_s=5, engine_id="eng-self")

    assert result == processes.StopResult(exited=True, killed=False, exit_code=-signal.SIGTERM)
    assert all(gone(w) for w in workers)
    assert not bool(process_tree.engine_tree(proc.pid, proc.create_time))


def test_spawn_refuses_an_untagged_plan(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SAGELLM_ENGINE_ID"):
        processes.spawn(LaunchPlan([sys.executable, "-c", "pass"], {}), tmp_path / "x.log")


def test_tail_log_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    log.write_text("".join(f"line {i}\n" for i in range(50_000)))
    assert processes.tail_log(log, lines=3) == "line 49997\nline 49998\nline 49999"
    assert processes.tail_log(log).split("\n")[0] == "line 49960"
    assert processes.tail_log(tmp_path / "missing.log") == ""
    short = tmp_path / "short.log"
    short.write_text("only\n")
    assert processes.tail_log(short, lines=5) == "only"
