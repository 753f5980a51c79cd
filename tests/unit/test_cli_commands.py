"""The REST commands of the CLI, run with CliRunner against the real API over HTTP.

The API (``create_app``) is served by werkzeug in a thread on a real redis-server. No
worker runs: the test writes a host heartbeat, so placement and the ledger are real and
engines stay PENDING (nothing consumes their start task)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest
import redis

from app.cli import client as cli_client
from app.core.models import EngineState
from app.state.ledger import Ledger
from app.state.registry import Registry
from tests.unit.cli_harness import (
    STEPS_TO_RUNNING,
    FakeWorker,
    add_host,
    api_url,
    followed_steps,
    only_engine_id,
    run,
    start_with_worker,
)

__all__ = ["api_url"]  # a fixture, used by name


def test_engine_start_no_wait_places_on_the_host_and_prints_the_id(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    res = run("engine", "start", "m", "--memory-gb", "20", "--label", "chat", "--no-wait")
    assert res.exit_code == 0, res.output
    eid = only_engine_id(real_redis)
    assert eid in res.output
    assert "PENDING on host a, GPUs 0, port 8100" in res.output
    assert Ledger(real_redis).reservation(eid) is not None


def test_engine_start_passes_extra_args_env_and_gpu_ids(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    res = run(
        "engine", "start", "m", "--memory-gb", "1", "--tp", "2", "--gpu-ids", "1,0",
        "--env", "OMP_NUM_THREADS=4", "--no-wait", "--", "--enforce-eager", "--seed", "3",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    spec = Registry(real_redis).engines()[0].spec
    assert spec.extra_args == ("--enforce-eager", "--seed", "3")
    assert spec.env == {"OMP_NUM_THREADS": "4"}
    assert spec.gpu_ids == (1, 0) and spec.tensor_parallel == 2


def test_engine_start_wait_shows_progress_then_times_out_still_starting(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    res = run("engine", "start", "m", "--memory-gb", "1", "--wait", "--timeout", "2")
    assert res.exit_code == 1
    eid = only_engine_id(real_redis)
    # The elapsed time depends on the machine's load; the progress line does not.
    assert re.search(r"\d+\.\ds PENDING on host a, GPUs 0, port 8100", res.output), res.output
    assert f"engine {eid} is still PENDING after 2s" in res.output
    assert f"sagellm engine logs {eid}" in res.output
    # a timeout of the CLI's wait leaves the engine alone
    assert Ledger(real_redis).reservation(eid) is not None


def test_engine_start_wait_follows_each_state_until_running(
    api_url: str, real_redis: redis.Redis
) -> None:
    res, eid = start_with_worker(real_redis, FakeWorker(real_redis))
    assert followed_steps(res.output) == STEPS_TO_RUNNING
    assert f"engine {eid} is RUNNING at http://127.0.0.1:8100 as m" in res.output


def test_engine_start_wait_reports_failed_with_its_error(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    with FakeWorker(real_redis, EngineState.FAILED, "CUDA out of memory"):
        res = run("engine", "start", "m", "--memory-gb", "1", "--timeout", "30")
    assert res.exit_code == 1
    eid = only_engine_id(real_redis)
    assert "FAILED: CUDA out of memory" in res.stdout
    assert f"engine {eid} FAILED: CUDA out of memory" in res.stderr


def test_engine_list_shows_the_engine_and_filters(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "2x80")
    run("engine", "start", "org/m", "--memory-gb", "1", "--served-model-name", "mine", "--no-wait")
    eid = only_engine_id(real_redis)
    res = run("engine", "list")
    assert res.exit_code == 0, res.output
    header, row = res.output.splitlines()
    assert header.split() == [
        "NAME", "LABEL", "STATE", "MODEL", "HOST", "GPUS", "URL", "AGE", "RESTARTS", "IDLE-STOP"
    ]  # fmt: skip
    *cells, age, restarts, idle = row.split()
    assert cells == [eid, "-", "PENDING", "mine", "a", "0", "http://127.0.0.1:8100"]
    assert re.fullmatch(r"\d+s", age) and restarts == "0" and idle == "-"
    assert run("engine", "list", "--state", "running").output.strip() == "no engines"
    assert eid in run("engine", "list", "--host", "a", "--kind", "llm").output


def test_engine_stop_no_wait_marks_it_stopping(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "2x80")
    run("engine", "start", "m", "--memory-gb", "1", "--no-wait")
    eid = only_engine_id(real_redis)
    res = run("engine", "stop", eid, "--no-wait")
    assert res.exit_code == 0, res.output
    assert f"engine {eid}: STOPPING" in res.output
    assert Registry(real_redis).get(eid).state.value == "STOPPING"


def test_engine_stop_unknown_id_is_an_error(api_url: str, real_redis: redis.Redis) -> None:
    res = run("engine", "stop", "eng-nope")
    assert res.exit_code == 1
    assert "eng-nope" in res.stderr


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["m", "--memory-gb", "1", "--tp", "0"], "tensor_parallel"),
        (["m; rm -rf /", "--memory-gb", "1"], "model"),
        (["m", "--memory-gb", "1", "--port", "9999"], "port"),
    ],
)
def test_bad_input_exits_2_naming_the_field_and_reserves_nothing(
    api_url: str, real_redis: redis.Redis, args: list[str], field: str
) -> None:
    add_host(real_redis, "a", "2x80")
    res = run("engine", "start", *args, "--no-wait")
    assert res.exit_code == 2, res.output
    assert field in res.stderr
    assert Ledger(real_redis).is_empty()
    assert Registry(real_redis).engines() == []


def test_nothing_fits_prints_the_reasons_once(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", '[{"total_gb": 24, "outside_gb": 10}]')
    res = run("engine", "start", "m", "--memory-gb", "33")
    assert res.exit_code == 1
    assert res.stderr.count("host a, GPU 0: 13.0 GB free, 33.0 GB needed") == 1
    assert Ledger(real_redis).is_empty()


def test_status_gpu_and_backends_render(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", '[{"total_gb": 80, "outside_gb": 10}, {"total_gb": 80}]')
    run("engine", "start", "m", "--memory-gb", "20", "--no-wait")

    st = run("status")
    assert st.exit_code == 0, st.output
    lines = st.output.splitlines()
    assert lines[1].split() == ["NAME", "ADDRESS", "UP", "HEARTBEAT", "AGE", "GPUS", "ENGINES"]
    host = lines[2].split()
    assert host[:3] == ["a", "127.0.0.1", "yes"] and host[-2:] == ["2", "1"]
    assert "ENGINES: 1 PENDING" in st.output

    g = run("gpu")
    assert g.exit_code == 0, g.output
    header, gpu0, _gpu1 = g.output.splitlines()
    assert header.split() == ["HOST", "IDX", "NAME", "TOTAL", "OUTSIDE", "RESERVED", "AVAILABLE"]
    # TOTAL, OUTSIDE, RESERVED, AVAILABLE of GPU 0 (binpack took it: it is fuller)
    assert gpu0.split()[-8:] == ["80.0", "GB", "10.0", "GB", "20.0", "GB", "49.0", "GB"]

    b = run("backends")
    assert b.exit_code == 0, b.output
    assert b.output.split() == ["LLM", "BACKENDS", "none", "EMBEDDING", "BACKENDS", "none"]


def test_preset_list_shows_both_builtins(api_url: str) -> None:
    res = run("preset", "list")
    assert res.exit_code == 0, res.output
    names = [line.split()[0] for line in res.output.splitlines()[1:] if line.strip()]
    assert names[:2] == ["cpu-demo", "qwen-mini-with-embeddings"]
    assert "tiny-chat,minilm" in res.output


def test_preset_show_dumps_the_expanded_preset(api_url: str, tmp_path: Path) -> None:
    res = run("preset", "show", "cpu-demo")
    assert res.exit_code == 0, res.output
    assert "name: cpu-demo" in res.output
    assert f"model: {tmp_path / 'api-data' / 'models' / 'tiny-chat'}" in res.output
    assert "${" not in res.output


def test_preset_dry_run_prints_the_plan_and_reserves_nothing(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "none")
    res = run("preset", "apply", "-n", "cpu-demo", "--dry-run")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "plan of preset cpu-demo:"
    assert lines[1].split() == ["ENGINE", "MODEL", "HOST", "GPUS", "PORT", "MEM/GPU", "ACTION"]
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert rows["tiny-chat"][2:5] == ["a", "-", "8100"] and rows["tiny-chat"][-1] == "start"
    assert rows["minilm"][2:5] == ["a", "-", "8101"] and rows["minilm"][-1] == "start"
    assert Ledger(real_redis).is_empty()
    assert Registry(real_redis).engines() == []


def test_preset_dry_run_that_cannot_place_exits_1_with_reasons(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "1x8")
    res = run("preset", "apply", "-n", "qwen-mini-with-embeddings", "--dry-run")
    assert res.exit_code == 1
    assert "error" in res.stdout  # the ACTION column
    assert "cannot be placed" in res.stderr
    assert Ledger(real_redis).is_empty()


def test_preset_apply_without_a_terminal_needs_yes(api_url: str, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "none")
    res = run("preset", "apply", "-n", "cpu-demo")
    assert res.exit_code == 1
    assert "pass --yes" in res.stderr
    assert Ledger(real_redis).is_empty()


def test_preset_apply_shows_progress_then_rolls_back_on_timeout(
    api_url: str, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the progress hears the engine the apply reserved as soon as it is written
    add_host(real_redis, "a", "none")
    res = run("preset", "apply", "-n", "cpu-demo", "--yes", "--timeout", "1")
    assert res.exit_code == 1, res.output
    engines = {e.spec.preset_engine: e for e in Registry(real_redis).engines()}
    chat = engines["tiny-chat"]
    # the progress loop saw the engine the apply reserved
    assert f"tiny-chat ({chat.id}): PENDING on host a, no GPU, port 8100" in res.stdout
    assert "engine 'tiny-chat'" in res.stderr and "did not start" in res.stderr
    assert "rolled back: " in res.stderr and chat.id in res.stderr
    assert {e.state.value for e in engines.values()} == {"STOPPING"}


def test_preset_apply_starts_all_prints_urls_and_a_second_apply_starts_nothing(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "none")
    with FakeWorker(real_redis):
        res = run("preset", "apply", "-n", "cpu-demo", "--yes", "--timeout", "30")
        assert res.exit_code == 0, res.output
        ids = {e.spec.preset_engine: e.id for e in Registry(real_redis).engines()}
        assert f"tiny-chat ({ids['tiny-chat']}): RUNNING at http://127.0.0.1:8100" in res.stdout
        result = res.stdout.split("preset cpu-demo applied in ")[1].splitlines()[1:]
        assert [line.split() for line in result] == [
            ["ENGINE", "ID", "STATE", "URL"],
            ["tiny-chat", ids["tiny-chat"], "RUNNING", "http://127.0.0.1:8100"],
            ["minilm", ids["minilm"], "RUNNING", "http://127.0.0.1:8101"],
        ]

        again = run("preset", "apply", "-n", "cpu-demo", "--yes")
    assert again.exit_code == 0, again.output
    assert again.stdout.count("already running") == 2
    assert "nothing to start: every engine of cpu-demo already runs" in again.stdout
    assert len(Registry(real_redis).engines()) == 2


def test_preset_apply_file_with_bad_yaml_names_the_file_and_line(
    api_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\nengines:\n  - name: a\n    model: [unclosed\n")
    res = run("preset", "apply", "--file", str(bad), "--dry-run")
    assert res.exit_code == 2
    assert f"{bad}: line " in res.stderr and "invalid YAML" in res.stderr


def test_preset_apply_file_with_a_bad_field_names_file_engine_and_field(
    api_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "tp.yaml"
    bad.write_text("version: 1\nname: x\nengines:\n  - name: chat\n    model: m\n    tp: 2\n")
    res = run("preset", "apply", "--file", str(bad), "--dry-run")
    assert res.exit_code == 2
    assert f"{bad}: engine 'chat': unknown field 'tp'" in res.stderr


def test_preset_apply_file_dry_run_plans_it(
    api_url: str, real_redis: redis.Redis, tmp_path: Path
) -> None:
    add_host(real_redis, "a", "1x80")
    good = tmp_path / "mine.yaml"
    good.write_text(
        "version: 1\nname: mine\nengines:\n"
        "  - name: chat\n    model: m\n    required_memory_gb: 10\n"
    )
    res = run("preset", "apply", "--file", str(good), "--dry-run")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[2].split() == [
        "chat",
        "m",
        "a",
        "0",
        "8100",
        "10.0",
        "GB",
        "start",
    ]
    assert Ledger(real_redis).is_empty()


def _record_requests(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every request the CLI sends, as (method, path, json) dicts; still sent."""
    sent: list[dict[str, Any]] = []
    real = cli_client.ApiClient.request

    def record(self: cli_client.ApiClient, method: str, path: str, **kw: Any) -> Any:
        sent.append({"method": method, "path": path, "json": kw.get("json")})
        return real(self, method, path, **kw)

    monkeypatch.setattr(cli_client.ApiClient, "request", record)
    return sent


def test_preset_apply_file_expands_the_users_variables_before_sending(
    api_url: str, real_redis: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_host(real_redis, "a", "1x80")
    monkeypatch.setenv("MY_CHAT_MODEL", "org/mine")
    good = tmp_path / "mine.yaml"
    good.write_text(
        "version: 1\nname: mine\nengines:\n"
        "  - name: chat\n    model: ${MY_CHAT_MODEL}\n"
        "    required_memory_gb: ${CHAT_GB:-10}\n"
        "    env: {HF_GREETING: '$${literal}'}\n"
    )
    sent = _record_requests(monkeypatch)

    res = run("preset", "apply", "--file", str(good), "--dry-run")

    assert res.exit_code == 0, res.output
    applies = [s for s in sent if s["path"].endswith("/apply")]
    assert len(applies) == 1
    text = applies[0]["json"]["yaml"]
    # the API is sent the user's values, not the raw ${...}
    assert "model: org/mine" in text and "required_memory_gb: 10" in text
    assert "${MY_CHAT_MODEL}" not in text and "${CHAT_GB" not in text
    assert "HF_GREETING: '$${literal}'" in text  # the escape travels; the API reads it as ${
    assert res.output.splitlines()[2].split()[:2] == ["chat", "org/mine"]
    assert Ledger(real_redis).is_empty()


def test_preset_apply_file_with_an_unset_variable_names_it_file_and_line_and_sends_nothing(
    api_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MY_UNSET_MODEL", raising=False)
    bad = tmp_path / "unset.yaml"
    bad.write_text("version: 1\nname: x\nengines:\n  - name: chat\n    model: ${MY_UNSET_MODEL}\n")
    sent = _record_requests(monkeypatch)

    res = run("preset", "apply", "--file", str(bad), "--dry-run")

    assert res.exit_code == 2
    assert f"{bad}: line 5: variable MY_UNSET_MODEL is not set and has no default" in res.stderr
    assert sent == []


def test_preset_apply_builtin_by_name_needs_no_client_variables(
    api_url: str, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cpu-demo's two model locations are the server's to fill, from its own settings
    add_host(real_redis, "a", "none")
    monkeypatch.delenv("SAGELLM_DATA_DIR")
    res = run("preset", "apply", "-n", "cpu-demo", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "api-data/models/tiny-chat" in res.output


def test_unknown_preset_is_invalid_input_listing_the_known_ones(api_url: str) -> None:
    res = run("preset", "apply", "-n", "nope", "--dry-run")
    assert res.exit_code == 2
    assert "nope" in res.stderr
    assert "cpu-demo" in res.stderr and "qwen-mini-with-embeddings" in res.stderr


def test_unreachable_api_says_where_it_looked_and_how_to_start_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"  # closed again: nothing listens
    monkeypatch.setenv("SAGELLM_API_URL", url)
    res = run("status")
    assert res.exit_code == 1
    assert f"cannot reach the sagellm API at {url}" in res.stderr
    assert "SAGELLM_API_URL" in res.stderr and "sagellm up" in res.stderr


def test_an_on_demand_engine_is_listed_on_standby_and_its_start_says_so(
    api_url: str, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    res = run(
        "engine", "start", "org/m", "--memory-gb", "1", "--served-model-name", "cold",
        "--on-demand", "--idle-timeout", "300",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "is on STANDBY: the first request for cold" in res.output
    eid = only_engine_id(real_redis)
    row = run("engine", "list").output.splitlines()[1]
    assert row.split()[:4] == [eid, "-", "STANDBY", "cold"]
    assert row.rstrip().endswith("on demand")
    bad = run("engine", "start", "org/m", "--memory-gb", "1", "--idle-timeout", "-1")
    assert bad.exit_code != 0 and "idle_timeout_s" in bad.output
