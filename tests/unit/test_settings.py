"""Settings: defaults, parsing, and start-up errors that name the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.core.balancing import BALANCER_NAMES
from app.core.engine_policy import ENGINE_HOST_ENV, ENGINE_ID_ENV
from app.core.errors import ConfigError
from app.settings import SETTINGS_DOC, Settings, parse_port_range


def test_defaults() -> None:
    s = Settings.from_env({"SAGELLM_HOST_NAME": "gpu1"})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.host_name == "gpu1"
    assert s.port_range == (8100, 8199)
    assert s.gpu_safety_margin_mib == 1024
    assert s.placement_policy == "binpack"
    assert s.mock_gpus == "" and s.disable_nvml is False


def test_host_name_defaults_to_the_machine_name() -> None:
    import socket

    assert Settings.from_env({}).host_name == socket.gethostname()


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("SAGELLM_PORT_RANGE", "80-90", "1024 <= LOW"),
        ("SAGELLM_PORT_RANGE", "9000-8000", "LOW <= HIGH"),
        ("SAGELLM_PORT_RANGE", "abc", "expected LOW-HIGH"),
        ("SAGELLM_GPU_SAFETY_MARGIN_GB", "-1", "must be >= 0"),
        ("SAGELLM_GPU_SAFETY_MARGIN_GB", "lots", "not a number"),
        ("SAGELLM_MOCK_GPUS", "2x", "cannot read"),
        ("SAGELLM_MOCK_GPUS", "[{", "invalid JSON"),
        ("SAGELLM_PLACEMENT_POLICY", "best", "unknown policy"),
        ("SAGELLM_REDIS_URL", "localhost:6379", "must start with redis://"),
        ("SAGELLM_HOST_NAME", "a b", "letters, digits"),
        ("SAGELLM_DISABLE_NVML", "maybe", "expected 1/0"),
        ("SAGELLM_DEFAULT_MAX_MODEL_LEN", "8", "must be >= 16"),
        ("SAGELLM_PORTRANGE", "1-2", "unknown setting"),
        ("SAGELLM_GATEWAY_POLICY", "random", "known: least_outstanding, round_robin"),
    ],
)
def test_invalid_values_fail_naming_the_variable(name: str, value: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    assert err.value.field == name
    assert name in err.value.message and why in err.value.message


def test_the_balancer_names_the_settings_accept_are_the_gateways() -> None:
    # The settings import only app.core: the names live there, the classes in the gateway.
    from app.gateway.balancing import BALANCERS

    assert set(BALANCER_NAMES) == set(BALANCERS)
    for name in BALANCER_NAMES:
        assert Settings.from_env({"SAGELLM_GATEWAY_POLICY": name}).gateway_policy == name


def test_engine_tags_are_not_settings() -> None:
    Settings.from_env({ENGINE_ID_ENV: "eng-1", ENGINE_HOST_ENV: "a"})


def test_port_range_single_port() -> None:
    assert parse_port_range("8100") == (8100, 8100)


def test_every_setting_is_documented_in_the_readme_with_its_default() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for name, (default, _) in SETTINGS_DOC.items():
        row = re.search(rf"^\|\s*`{name}`\s*\|([^|]*)\|", readme, re.M)
        assert row, f"{name} missing from the README configuration table"
        shown = row.group(1).strip().strip("`")
        assert shown == (default or "(unset)"), f"{name}: README says {shown!r}, code {default!r}"
