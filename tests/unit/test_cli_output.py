"""What a new user meets in the CLI, each fixed once (issue 12): how engines are named,
what `engine show`, `stop`, `restart`, `logs -f`, a dry run and `gpu` say, the plain
and the terminal output, `-o json`, and one test per exit code. Run with CliRunner
against the real API over HTTP (``tests.unit.cli_harness``)."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest
import redis

from app.cli import client as cli_client
from app.cli import engines as cli_engines
from app.cli import render
from app.core.models import EngineState
from app.state.ledger import Ledger
from app.state.registry import Registry
from tests.unit.cli_harness import (
    FakeWorker,
    add_host,
    api_url,
    only_engine_id,
    run,
    start_with_worker,
)

__all__ = ["api_url"]  # a fixture, used by name

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def start(*args: str) -> str:
    """Start an engine (no wait); its id."""
    res = run("engine", "start", "--no-wait", *args)
    assert res.exit_code == 0, res.output
    found = re.search(r"engine (eng-[0-9a-f]+) accepted", res.output)
    assert found, res.output
    return found.group(1)


def stop_in_registry(r: redis.Redis, eid: str) -> None:
    Registry(r).transition(eid, EngineState.STOPPING)
    Registry(r).transition(eid, EngineState.STOPPED, exit_code=0)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI believes stdout is a 200-column terminal."""
    monkeypatch.setattr(render, "is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "200")


# ---------------------------------------------------------------- plain, terminal, json


def test_without_a_terminal_engine_list_is_plain_columns_one_row_per_engine(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    chat = start("org/m", "--memory-gb", "1", "--label", "chat")
    emb = start("org/e", "--kind", "embedding", "--served-model-name", "emb")
    res = run("engine", "list")
    assert res.exit_code == 0, res.output
    assert not ANSI.search(res.output)
    header, *rows = res.output.splitlines()
    assert header.split()[:4] == ["NAME", "LABEL", "STATE", "MODEL"]
    table = {row.split()[0]: row.split() for row in rows}
    assert table[chat][1:6] == ["chat", "PENDING", "org/m", "a", "0"]
    assert table[emb][1:6] == ["-", "PENDING", "emb", "a", "-"]


def test_on_a_terminal_engine_list_colours_the_state(
    api_url: str, real_redis: redis.Redis, terminal: None
) -> None:
    add_host(real_redis, "a", "2x80")
    eid = start("m", "--memory-gb", "1")
    res = run("engine", "list")
    assert res.exit_code == 0, res.output
    assert ANSI.search(res.output)  # colour codes: this is the rich table
    plain = ANSI.sub("", res.output)
    row = next(line for line in plain.splitlines() if eid in line)
    assert "PENDING" in row and "http://127.0.0.1:8100" in row


def test_every_state_has_a_colour() -> None:
    assert set(render.STATE_STYLES) == set(EngineState)


def test_engine_start_on_a_terminal_shows_a_live_table_then_the_outcome(
    api_url: str, real_redis: redis.Redis, terminal: None
) -> None:
    res, eid = start_with_worker(real_redis, FakeWorker(real_redis))
    plain = ANSI.sub("", res.output)
    assert "ENGINE" in plain and "DETAIL" in plain  # the live table's header
    assert f"engine {eid} is RUNNING at http://127.0.0.1:8100 as m" in plain


@pytest.mark.parametrize(
    ("command", "check"),
    [
        (["engine", "list"], lambda data, eid: [e["id"] for e in data] == [eid]),
        (["status"], lambda data, eid: [e["id"] for e in data["engines"]] == [eid]),
        (["gpu"], lambda data, eid: sum(g["reserved_gb"] for g in data) == 1.0),
        (["backends"], lambda data, eid: data["llm_backends"] == []),
        (["preset", "list"], lambda data, eid: "cpu-demo" in [p["name"] for p in data]),
        (["preset", "show", "cpu-demo"], lambda data, eid: data["name"] == "cpu-demo"),
    ],
)
def test_output_json_is_the_apis_data(
    api_url: str, real_redis: redis.Redis, command: list[str], check: Any
) -> None:
    add_host(real_redis, "a", "2x80")
    eid = start("m", "--memory-gb", "1")
    res = run(*command, "-o", "json")
    assert res.exit_code == 0, res.output
    assert check(json.loads(res.output), eid)


def test_engine_show_json_is_the_raw_record_and_text_is_for_people(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    eid = start("m", "--no-gpu", "--label", "chat")  # a CPU engine has no launch flags
    raw = json.loads(run("engine", "show", eid, "-o", "json").output)
    assert isinstance(raw["created_at"], float) and raw["launch"] == {}

    res = run("engine", "show", eid)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == f"{eid}: PENDING on host a, no GPU, port 8100"
    assert not re.search(r"\b1\d{9}\.\d", res.output)  # no epoch floats
    assert re.search(r"created_at: '?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+s ago\)", res.output)
    assert "launch" not in res.output  # it was {}
    assert "null" not in res.output and "{}" not in res.output
    assert "label: chat" in res.output


def test_ages_read_like_kubectl() -> None:
    assert [render.age(s) for s in (0, 59, 125, 600, 3 * 3600 + 5, 30 * 3600, 50 * 3600)] == [
        "0s", "59s", "2m5s", "10m", "3h", "30h", "2d2h",
    ]  # fmt: skip


# ---------------------------------------------------------------- naming an engine


def test_an_engine_is_found_by_id_prefix_label_or_served_name(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    eid = start("org/m", "--memory-gb", "1", "--label", "chat", "--served-model-name", "mine")
    for ref in (eid, eid[:7], "chat", "mine"):
        res = run("engine", "show", ref, "-o", "json")
        assert res.exit_code == 0, (ref, res.output)
        assert json.loads(res.output)["id"] == eid, ref


def test_an_ambiguous_name_exits_2_listing_the_candidates(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    one = start("m", "--memory-gb", "1", "--label", "chat")
    two = start("m", "--memory-gb", "1", "--label", "chat")
    res = run("engine", "stop", "chat")
    assert res.exit_code == 2
    assert "'chat' names 2 engines" in res.stderr
    assert one in res.stderr and two in res.stderr
    assert {e.state for e in Registry(real_redis).engines()} == {EngineState.PENDING}


def test_a_label_reused_after_a_stop_names_the_live_engine(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    old = start("m", "--memory-gb", "1", "--label", "chat")
    stop_in_registry(real_redis, old)
    new = start("m", "--memory-gb", "1", "--label", "chat")
    res = run("engine", "show", "chat", "-o", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["id"] == new


def test_no_match_exits_1_and_says_what_was_tried(api_url: str, real_redis: redis.Redis) -> None:
    res = run("engine", "show", "nope")
    assert res.exit_code == 1
    assert "no engine 'nope': no id, id prefix, label or served name matches" in res.stderr


# ---------------------------------------------------------------- stop, restart, logs


def test_engine_stop_waits_and_prints_the_final_state(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    eid = start("m", "--memory-gb", "1", "--label", "chat")
    with FakeWorker(real_redis):
        res = run("engine", "stop", "chat", "--timeout", "30")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == f"engine {eid}: STOPPED (exit code 0)"
    assert Ledger(real_redis).reservation(eid) is None


def test_restart_of_a_stopped_engine_says_the_command_that_starts_it_again(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    eid = start(
        "org/m", "--memory-gb", "2", "--label", "chat", "--tp", "2", "--no-gpu",
        "--env", "HF_GREETING=hi there", "--", "--enforce-eager",
    )  # fmt: skip
    stop_in_registry(real_redis, eid)
    res = run("engine", "restart", "chat")
    assert res.exit_code == 1
    assert f"engine {eid} is STOPPED: a stopped engine is not restarted" in res.stderr
    command = res.stderr.strip().splitlines()[-1].strip()
    assert command.startswith("sagellm engine start org/m ")
    # the command it gives starts an engine with the same spec
    _sagellm, engine, verb, *rest = shlex.split(command)
    again = run(engine, verb, "--no-wait", *rest)
    assert again.exit_code == 0, again.output
    old, new = sorted(Registry(real_redis).engines(), key=lambda e: e.id != eid)
    assert new.spec == old.spec


def test_restart_of_a_preset_engine_that_stopped_names_the_preset(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "none")
    with FakeWorker(real_redis):
        assert run("preset", "apply", "-n", "cpu-demo", "--yes", "--timeout", "30").exit_code == 0
        assert run("engine", "stop", "minilm", "--timeout", "30").exit_code == 0
    res = run("engine", "restart", "minilm")
    assert res.exit_code == 1
    assert "start a new one with its preset (or on its own):" in res.stderr
    assert "  sagellm preset apply -n cpu-demo\n" in res.stderr


def test_new_lines_are_what_follows_the_overlap() -> None:
    new_lines = cli_engines.new_lines
    assert new_lines(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]
    assert new_lines(["a", "b"], ["a", "b"]) == []
    assert new_lines([], ["a"]) == ["a"]
    assert new_lines(["x", "y"], ["p", "q"]) == ["p", "q"]  # no overlap: all of it
    assert new_lines(["a", "a"], ["a", "a", "a"]) == ["a"]


def test_logs_follow_prints_each_new_line_once_until_the_engine_stops(
    api_url: str, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_host(real_redis, "a", "2x80")
    eid = start("m", "--memory-gb", "1", "--label", "chat")
    log = [f"line {i}" for i in range(10)]
    reads = 0
    real = cli_client.ApiClient.request

    def request(self: cli_client.ApiClient, method: str, path: str, **kw: Any) -> Any:
        # No worker runs to read the log on its host: this stands in for it. Each read
        # finds two new lines; the engine stops after the fourth read.
        nonlocal reads
        if not path.endswith("/logs"):
            return real(self, method, path, **kw)
        reads += 1
        if reads > 1:
            log.extend([f"line {len(log)}", f"line {len(log) + 1}"])
        if reads == 4:
            stop_in_registry(real_redis, eid)
        return {"engine_id": eid, "host": "a", "lines": log[-kw["params"]["tail"] :]}

    monkeypatch.setattr(cli_client.ApiClient, "request", request)
    monkeypatch.setattr(cli_engines, "LOG_POLL_S", 0.01)
    monkeypatch.setattr(cli_engines, "LOG_FOLLOW_WINDOW", 5)  # smaller than what grows
    res = run("engine", "logs", "chat", "--tail", "3", "-f")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == log[7:]
    assert reads == 5 and len(log) == 18
    assert f"engine {eid}: STOPPED (exit code 0)" in res.stderr


# ---------------------------------------------------------------- dry run, gpu


def test_a_dry_run_says_nothing_was_reserved(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "none")
    res = run("preset", "apply", "-n", "cpu-demo", "--dry-run")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == "dry run: nothing was reserved or started"
    add_host(real_redis, "a", "1x8")
    bad = run("preset", "apply", "-n", "qwen-mini-with-embeddings", "--dry-run")
    assert bad.exit_code == 1
    assert "dry run: nothing was reserved or started" in bad.stderr
    assert Ledger(real_redis).is_empty()


def test_gpu_without_any_worker_says_none_is_alive(api_url: str) -> None:
    res = run("gpu")
    assert res.exit_code == 0
    assert res.output.startswith("no GPUs known: no worker is alive")


def test_gpu_with_workers_that_have_no_gpu_says_so(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "cpu1", "none")
    add_host(real_redis, "cpu2", "none")
    res = run("gpu")
    assert res.exit_code == 0
    assert "2 worker(s) alive (cpu1, cpu2) and none has a GPU" in res.output
    assert "is a worker running" not in res.output


# ---------------------------------------------------------------- exit codes


def test_exit_code_0_when_done(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "1x80")
    assert run("engine", "start", "m", "--memory-gb", "1", "--no-wait").exit_code == 0


def test_exit_code_1_when_nothing_fits_now(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "1x80")
    assert run("engine", "start", "m", "--memory-gb", "60", "--no-wait").exit_code == 0
    res = run("engine", "start", "m", "--memory-gb", "60", "--no-wait")
    assert res.exit_code == 1
    assert "no room for m" in res.stderr


def test_exit_code_2_when_no_host_could_ever_take_it(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "1x80")
    res = run("engine", "start", "m", "--memory-gb", "1", "--tp", "2", "--no-wait")
    assert res.exit_code == 2
    assert "2 GPUs needed on one host" in res.stderr and "has 1" in res.stderr
    assert Ledger(real_redis).is_empty()


def test_exit_code_2_for_an_unknown_preset(api_url: str) -> None:
    res = run("preset", "show", "nope")
    assert res.exit_code == 2
    assert "no built-in preset 'nope'" in res.stderr and "cpu-demo" in res.stderr


def test_exit_code_130_when_interrupted_while_following(
    api_url: str, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_host(real_redis, "a", "1x80")
    real = cli_client.ApiClient.request

    def request(self: cli_client.ApiClient, method: str, path: str, **kw: Any) -> Any:
        if method == "GET" and re.search(r"/engines/eng-[0-9a-f]+$", path):
            raise KeyboardInterrupt  # Ctrl-C during a poll
        return real(self, method, path, **kw)

    monkeypatch.setattr(cli_client.ApiClient, "request", request)
    res = run("engine", "start", "m", "--memory-gb", "1", "--timeout", "30")
    assert res.exit_code == 130
    eid = only_engine_id(real_redis)
    assert f"interrupted: engine {eid} goes on" in res.stderr
    assert Ledger(real_redis).reservation(eid) is not None  # the CLI left it alone


# ---------------------------------------------------------------- models


def test_models_lists_each_hosts_models_with_the_estimate(
    api_url: str, real_redis: redis.Redis
) -> None:
    from pathlib import Path

    from app.core.memory import estimate_memory
    from app.core.memory.facts import facts_from_config
    from app.state.model_facts import publish_model_facts

    config = json.loads(
        (
            Path(__file__).parents[1] / "fixtures/models/Qwen2.5-1.5B-Instruct/config.json"
        ).read_text()
    )
    facts = facts_from_config(config, "Qwen/Qwen2.5-1.5B-Instruct", "/models/qwen")
    add_host(real_redis, "a", "1x80")
    add_host(real_redis, "b", "1x80")
    publish_model_facts(real_redis, "a", {facts.model: facts})

    res = run("models")
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if "Qwen/Qwen2.5-1.5B-Instruct" in line]
    assert len(lines) == 1 and lines[0].split()[0] == "a"
    expected = estimate_memory(facts.model, facts=facts, max_model_len=32768)
    assert f"{expected.per_gpu_mib / 1024:.1f} GB" in lines[0]

    data = json.loads(run("models", "-o", "json").output)
    hosts = {h["host"]: h for h in data["hosts"]}
    assert [m["model"] for m in hosts["a"]["models"]] == ["Qwen/Qwen2.5-1.5B-Instruct"]
    assert hosts["b"]["models"] == []


def test_models_says_when_no_host_has_any(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "1x80")
    res = run("models")
    assert res.exit_code == 0
    assert "no models found on any host's disk" in res.output
