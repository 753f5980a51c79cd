"""docker-compose.yml and the Dockerfile, checked by parsing (no Docker engine needed)
against the code they run: every command is a real entry point with options it accepts,
every variable is a known setting, and the deployment rules hold (one beat, Redis that
persists and never evicts, a GPU worker that names its host)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from app.settings import SETTINGS_DOC, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# Services that run the project image (redis runs the official one).
OURS = ("api", "beat", "flower", "worker")
# Variables our services may set that are not sagellm settings.
STANDARD_ENV = {
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_TOKEN",
    "NVIDIA_VISIBLE_DEVICES",
    "PROMETHEUS_MULTIPROC_DIR",
    "NVIDIA_DRIVER_CAPABILITIES",
    "CUDA_DEVICE_ORDER",
    "PYTHONUNBUFFERED",
}
GPU_HOST = {"SAGELLM_HOST_NAME": "gpu-a", "SAGELLM_HOST_ADDRESS": "10.0.0.11"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR:+alt} ...
_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation of ``text`` against ``env`` (``$$`` is a literal ``$``)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"] or "", m["arg"] or ""
        value = env.get(name)
        empty = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if empty else str(value)
        if op.endswith("?"):
            if empty:
                raise LookupError(f"required variable {name} is missing a value: {arg}")
            return str(value)
        if op.endswith("+"):
            return "" if empty else arg
        return value or ""

    return "\x00".join(_VAR.sub(one, part) for part in text.split("$$")).replace("\x00", "$")


def _resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_resolve(x, env) for x in node]
    if isinstance(node, dict):
        return {k: _resolve(v, env) for k, v in node.items()}
    return node


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The file as written (anchors and merge keys applied, nothing interpolated)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and "services" in data
    return data


@pytest.fixture(scope="module")
def services(raw: dict[str, Any]) -> dict[str, Any]:
    """Services as Compose runs them on a GPU host whose shell sets only the host's name
    and address: every other variable takes the file's default."""
    resolved: dict[str, Any] = _resolve(raw["services"], GPU_HOST)
    return resolved


def _argv(service: Mapping[str, Any]) -> list[str]:
    """The program and arguments a service runs; an ``sh -c`` wrapper's ``exec`` line."""
    cmd = service["command"]
    argv = shlex.split(cmd) if isinstance(cmd, str) else [str(x) for x in cmd]
    if argv[:2] == ["sh", "-c"]:
        execs = re.findall(r"\bexec\s+([^;&|\n]+)", argv[2])
        assert len(execs) == 1, f"{argv[2]!r}: expected one `exec <program>`"
        return shlex.split(execs[0])
    return argv


def _env(service: Mapping[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _published(service: Mapping[str, Any]) -> set[int]:
    """Host ports of ``ports:`` entries ("6379:6379", "0.0.0.0:8000:8000", long form)."""
    out = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.add(int(p["published"]))
        else:
            out.add(int(str(p).split("/")[0].split(":")[-2]))
    return out


def test_the_five_services_exist(services: dict[str, Any]) -> None:
    assert {"redis", "api", "beat", "flower", "worker"} <= set(services)


def test_redis_persists_and_never_evicts(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].endswith(":7")
    args = _argv(redis)
    assert args[0] == "redis-server"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"]), "no volume on /data"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_redis_password_is_off_by_default_and_on_when_set(raw: dict[str, Any]) -> None:
    plain = _resolve(raw["services"], {})
    assert _argv(plain["redis"])[-2:] == ["--requirepass", ""]  # "" = no password
    assert Settings.from_env(_defined(_env(plain["api"]))).redis_url.startswith("redis://")
    locked = _resolve(raw["services"], {"REDIS_PASSWORD": "s3cret"})
    assert _argv(locked["redis"])[-2:] == ["--requirepass", "s3cret"]
    assert _env(locked["api"])["SAGELLM_REDIS_URL"] == "redis://:s3cret@redis:6379/0"


def test_published_ports(services: dict[str, Any]) -> None:
    assert 6379 in _published(services["redis"])
    assert 8000 in _published(services["api"])
    assert 5555 in _published(services["flower"])


def test_exactly_one_beat(services: dict[str, Any]) -> None:
    beat = services["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert beat.get("scale", 1) == 1


def test_head_services_wait_for_a_healthy_redis(services: dict[str, Any]) -> None:
    for name in ("api", "beat", "flower"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_api_healthcheck_asks_health_without_curl(services: dict[str, Any]) -> None:
    check = " ".join(services["api"]["healthcheck"]["test"])
    assert "urllib.request" in check and "127.0.0.1:8000/health" in check


def test_worker_reserves_nvidia_gpus(services: dict[str, Any]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_worker_runs_on_the_hosts_network_and_pids_and_only_when_asked(
    services: dict[str, Any],
) -> None:
    worker = services["worker"]
    assert worker["network_mode"] == "host"  # engines are reached at the host's address
    assert worker["pid"] == "host"  # NVML reports host pids
    assert "worker" in worker["profiles"]  # a plain `up` on the head leaves it out
    # Starting the worker on a GPU host must not start a second Redis there.
    assert "depends_on" not in worker


def test_worker_sets_host_name_and_address_from_the_shell(raw: dict[str, Any]) -> None:
    env = _env(raw["services"]["worker"])
    for name in ("SAGELLM_HOST_NAME", "SAGELLM_HOST_ADDRESS"):
        value = env.get(name)
        assert value is not None and f"${{{name}" in value, f"{name}: set it from ${{{name}}}"
        assert interpolate(value, GPU_HOST) == GPU_HOST[name]


def _run_worker_command(services: dict[str, Any], env: dict[str, str], tmp: Path) -> str:
    """Run the worker's command with a stand-in ``sagellm`` that prints its argv."""
    fake = tmp / "sagellm"
    fake.write_text('#!/bin/sh\necho "ran sagellm $*"\n')
    fake.chmod(0o755)
    cmd = [str(x) for x in services["worker"]["command"]]
    proc = subprocess.run(
        cmd,
        env={"PATH": f"{tmp}{os.pathsep}{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return f"rc={proc.returncode} {proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("missing", ["SAGELLM_HOST_NAME", "SAGELLM_HOST_ADDRESS"])
def test_worker_refuses_to_start_without_its_host_settings(
    services: dict[str, Any], missing: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in GPU_HOST.items() if k != missing}
    out = _run_worker_command(services, env, tmp_path)
    assert not out.startswith("rc=0") and missing in out and "ran sagellm" not in out


def test_worker_starts_sagellm_worker_when_its_host_is_named(
    services: dict[str, Any], tmp_path: Path
) -> None:
    out = _run_worker_command(services, dict(GPU_HOST), tmp_path)
    assert out.startswith("rc=0") and "ran sagellm worker" in out


@pytest.mark.parametrize("name", OURS)
def test_command_is_a_real_entry_point(services: dict[str, Any], name: str) -> None:
    argv = _argv(services[name])
    if argv[0] == "sagellm":
        from app.cli import sagellm

        sub, args = argv[1], argv[2:]
        assert sub in sagellm.commands, f"`sagellm {sub}`: known: {sorted(sagellm.commands)}"
        sagellm.commands[sub].make_context(sub, list(args))  # raises on an unknown option
    elif argv[0] == "gunicorn":
        _check_gunicorn(argv)
    else:
        pytest.fail(f"{name}: {argv[0]!r} is neither `sagellm <command>` nor gunicorn")


def _check_gunicorn(argv: list[str]) -> None:
    from gunicorn.config import Config

    import app
    from app.dev.stack import gunicorn_argv

    parsed = Config().parser().parse_args(argv[1:])  # exits on a flag gunicorn lacks
    module, _, call = parsed.args[0].partition(":")
    assert module == "app" and call == "create_app()"
    assert callable(app.create_app)
    # The same server as `sagellm up`, with the documented default sizes.
    expected = gunicorn_argv(
        "0.0.0.0:8000",
        int(SETTINGS_DOC["SAGELLM_API_WORKERS"][0]),
        int(SETTINGS_DOC["SAGELLM_API_CONNECTIONS"][0]),
    )
    assert argv[1:] == expected[expected.index("--bind") :]


def _defined(env: Mapping[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in env.items() if v is not None}


@pytest.mark.parametrize("name", OURS)
def test_environment_names_only_known_variables(raw: dict[str, Any], name: str) -> None:
    env = _env(raw["services"][name])
    unknown = sorted(
        k for k in env if not (k in SETTINGS_DOC if k.startswith("SAGELLM_") else k in STANDARD_ENV)
    )
    assert not unknown, (
        f"service {name} sets {', '.join(unknown)}: not in app.settings.SETTINGS_DOC "
        f"nor a standard variable ({', '.join(sorted(STANDARD_ENV))})"
    )


def test_every_sagellm_variable_the_file_reads_is_a_setting_with_its_default() -> None:
    """A ``${SAGELLM_X}`` that is no setting would make the `sagellm` CLI refuse the
    shell that sets it; a default that differs from SETTINGS_DOC would lie."""
    text = COMPOSE.read_text().replace("$$", "")
    refs = [m for m in _VAR.finditer(text) if m["name"].startswith("SAGELLM_")]
    assert refs
    unknown = sorted({m["name"] for m in refs} - set(SETTINGS_DOC))
    assert not unknown, f"not in app.settings.SETTINGS_DOC: {', '.join(unknown)}"
    for m in refs:
        if m["op"] in (":-", "-") and m["arg"]:
            assert m["arg"] == SETTINGS_DOC[m["name"]][0], m[0]


@pytest.mark.parametrize("name", OURS)
def test_service_environment_passes_settings_validation(
    services: dict[str, Any], name: str
) -> None:
    Settings.from_env(_defined(_env(services[name])))


def _dockerfile() -> str:
    return re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continued lines


def test_dockerfile_installs_the_package_with_engine_extras() -> None:
    text = _dockerfile()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^ARG ENGINES=(""|)$', text, re.M), "ARG ENGINES with an empty default"
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert any("/opt/sagellm" in line and "$ENGINES" in line for line in installs), installs
    assert re.search(r"^USER (?!root\b|0\b)\S+", text, re.M), "runs as root"
    assert re.search(r"SAGELLM_DATA_DIR=/data\b", text)
    assert re.search(r'^VOLUME \["?/data"?\]', text, re.M)
    for src in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"


def test_worker_image_extras_exist_in_pyproject(services: dict[str, Any]) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    engines = services["worker"]["build"]["args"]["ENGINES"].split(",")
    assert "vllm" in engines
    assert set(engines) <= set(extras), f"unknown extras: {set(engines) - set(extras)}"


def test_flower_listens_for_the_published_port_only_with_basic_auth(
    services: dict[str, Any],
) -> None:
    """Flower's API can queue any task and shut workers down: on 0.0.0.0 (needed for
    the published port) `sagellm flower` refuses to start without basic auth."""
    from app.cli import flower_argv

    flower = services["flower"]
    argv = _argv(flower)
    address = argv[argv.index("--address") + 1]
    assert address == "0.0.0.0"
    assert "FLOWER_UNAUTHENTICATED_API" not in _env(flower)
    with pytest.raises(click.ClickException, match="SAGELLM_FLOWER_BASIC_AUTH"):
        flower_argv(5555, address, "", {})


def test_api_refuses_to_start_open_on_its_published_address(services: dict[str, Any]) -> None:
    """The API binds 0.0.0.0 and says so in SAGELLM_API_URL: without an admin token
    (and no SAGELLM_ALLOW_OPEN_API) it refuses to start."""
    from app import check_exposure
    from app.core.errors import ConfigError

    env = _defined(_env(services["api"]))
    assert env["SAGELLM_API_URL"] == "http://0.0.0.0:8000"
    open_env = {k: v for k, v in env.items() if k != "SAGELLM_ADMIN_TOKEN"}
    with pytest.raises(ConfigError, match="SAGELLM_ADMIN_TOKEN"):
        check_exposure(Settings.from_env(open_env))
    assert check_exposure(Settings.from_env({**open_env, "SAGELLM_ADMIN_TOKEN": "t"})) == ("*",)


def test_only_the_api_sums_metrics_across_its_processes(raw: dict[str, Any]) -> None:
    # gunicorn's workers share gateway counters through this folder; a worker must not
    # have it (engines inherit the worker's environment).
    services = raw["services"]
    assert "PROMETHEUS_MULTIPROC_DIR" in _env(services["api"])
    folder = _env(services["api"])["PROMETHEUS_MULTIPROC_DIR"]
    assert folder in services["api"].get("tmpfs", [])  # exists, and empty at each start
    others = [n for n in services if n != "api" and "PROMETHEUS_MULTIPROC_DIR" in _env(services[n])]
    assert not others


def _mounts(service: Mapping[str, Any]) -> list[str]:
    return [
        str(v) if not isinstance(v, dict) else str(v.get("target"))
        for v in service.get("volumes", [])
    ]


def test_only_the_gpu_hosts_mount_a_hugging_face_cache(services: dict[str, Any]) -> None:
    """Each worker measures the models on its own host and publishes their facts: the
    head estimates from those, so it needs no copy of the GPU hosts' cache."""
    for name in ("api", "beat", "flower"):
        mounts = _mounts(services[name])
        assert not [m for m in mounts if "huggingface" in m], f"{name} mounts {mounts}"
    assert any(m.endswith(":/home/sagellm/.cache/huggingface") for m in _mounts(services["worker"]))
