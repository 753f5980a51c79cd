"""What a management caller may make an engine do: env, flags and model paths.

Every refusal is a ``ValidationError`` naming the field and the reason, raised before
anything is reserved (API edge) and again when the worker builds the argv.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.engine_policy import EnginePolicy
from app.core.errors import ConfigError, ValidationError
from app.core.spec import EngineSpec
from app.settings import Settings
from workers.runtimes.embedding import EmbeddingRuntime
from workers.runtimes.vllm import VllmRuntime


def policy(tmp_path: Path, *unsafe: str) -> EnginePolicy:
    return EnginePolicy(model_roots=(str(tmp_path / "models"),), unsafe_flags=frozenset(unsafe))


def vllm_check(spec: EngineSpec, pol: EnginePolicy) -> None:
    VllmRuntime().validate(spec, pol)


# ------------------------------------------------------------------------ environment


@pytest.mark.parametrize(
    "name",
    [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PATH",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "SAGELLM_REDIS_URL",
        "SAGELLM_ENGINE_ID",
        "CUDA_VISIBLE_DEVICES",
        "PROMETHEUS_MULTIPROC_DIR",
        "VLLM_PLUGINS",
        "VLLM_NCCL_SO_PATH",
        "VLLM_LOGGING_CONFIG_PATH",
        "VLLM_TORCH_PROFILER_DIR",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        "NCCL_NET_PLUGIN",
        "NCCL_DEBUG_FILE",
        "TORCH_EXTENSIONS_DIR",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_MODULES_CACHE",
        "FAKE_ANYTHING",
        "lower_case",
    ],
)
def test_env_outside_the_allow_list_is_refused_naming_the_variable(name: str) -> None:
    with pytest.raises(ValidationError) as err:
        EngineSpec(model="org/m", env={name: "x"}).validate()
    assert err.value.field == "env"
    assert err.value.message.startswith(f"env: {name!r} is not allowed: ")


@pytest.mark.parametrize(
    "name",
    [
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
        "TRANSFORMERS_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "OMP_NUM_THREADS",
        "CUDA_DEVICE_MAX_CONNECTIONS",
        "PYTORCH_CUDA_ALLOC_CONF",
        "VLLM_LOGGING_LEVEL",
        "VLLM_ATTENTION_BACKEND",
        "NCCL_DEBUG",
        "NCCL_SOCKET_IFNAME",
        "TORCH_CUDA_ARCH_LIST",
    ],
)
def test_env_on_the_allow_list_passes(name: str) -> None:
    EngineSpec(model="org/m", env={name: "1"}).validate()


@pytest.mark.parametrize("value", ["a\x00b", "a\nb", "a\rb"])
def test_env_values_with_nul_or_newline_are_refused(value: str) -> None:
    with pytest.raises(ValidationError) as err:
        EngineSpec(model="org/m", env={"OMP_NUM_THREADS": value}).validate()
    assert err.value.field == "env"
    assert "OMP_NUM_THREADS" in err.value.message


# ------------------------------------------------------------------------ flags


@pytest.mark.parametrize(
    ("extra", "owned", "use"),
    [
        (("--po", "9999"), "--port", "port"),
        (("--po=9999",), "--port", "port"),
        (("--ho", "0.0.0.0"), "--host", "SAGELLM_HOST_ADDRESS"),
        (("--served", "x"), "--served-model-name", "served_model_name"),
        (("--tensor-p", "8"), "--tensor-parallel-size", "tensor_parallel"),
        (("--tensor_p", "8"), "--tensor-parallel-size", "tensor_parallel"),
        (("--pipeline-parallel-size=2",), "--pipeline-parallel-size", "pipeline_parallel"),
        (("-tp8",), "-tp", "tensor_parallel"),
        (("-t", "8"), "-tp", "tensor_parallel"),
        (("--mod", "/etc"), "--model", "model"),
        (("--enforce-eager", "--max-num-seqs", "--port"), "--port", "port"),
    ],
)
def test_owned_flags_are_refused_in_any_abbreviation(
    tmp_path: Path, extra: tuple[str, ...], owned: str, use: str
) -> None:
    spec = EngineSpec(model="org/m", extra_args=extra)
    with pytest.raises(ValidationError) as err:
        vllm_check(spec, policy(tmp_path))
    assert err.value.field == "extra_args"
    assert owned in err.value.message and use in err.value.message


@pytest.mark.parametrize("extra", [("--dev", "cuda"), ("--served_model_name", "x")])
def test_own_server_owned_flags_are_refused_abbreviated(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    spec = EngineSpec(model="org/m", kind="embedding", extra_args=extra)  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as err:
        EmbeddingRuntime().validate(spec, policy(tmp_path))
    assert err.value.field == "extra_args"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (("--config", "/tmp/x.yaml"), "reads more flags"),
        (("--config=/tmp/x.yaml",), "reads more flags"),
        (("--conf", "/tmp/x.yaml"), "reads more flags"),
        (("--enforce-eager", "--", "/etc"), "ends option parsing"),
        (("--trust-remote-code",), "runs code from the model repository"),
        (("--trust_remote",), "runs code from the model repository"),
        (("--allowed-local-media-path", "/"), "read files on the host"),
        (("--chat-template", "/etc/passwd"), "file"),
        (("--chat-template=/etc/passwd",), "file"),
        (("--worker-extension-cls", "os.system"), "imports"),
        (("--tokenizer", "/etc"), "outside the allowed model roots"),
        (("--download-dir=/etc",), "outside the allowed model roots"),
        (("--max-num-seqs", "a\x00b"), "NUL"),
    ],
)
def test_flags_that_run_code_read_host_files_or_escape_parsing_are_refused(
    tmp_path: Path, extra: tuple[str, ...], reason: str
) -> None:
    spec = EngineSpec(model="org/m", extra_args=extra)
    with pytest.raises(ValidationError) as err:
        vllm_check(spec, policy(tmp_path))
    assert err.value.field == "extra_args"
    assert err.value.message.startswith("extra_args: ")
    assert reason in err.value.message


def test_unsafe_flag_passes_when_the_operator_lists_it(tmp_path: Path) -> None:
    spec = EngineSpec(model="org/m", extra_args=("--trust-remote-code", "--chat-template", "/t.j"))
    vllm_check(spec, policy(tmp_path, "--trust-remote-code", "--chat-template"))
    with pytest.raises(ValidationError, match="chat-template"):
        vllm_check(spec, policy(tmp_path, "--trust-remote-code"))


@pytest.mark.parametrize(
    "extra",
    [
        ("--enforce-eager", "--max-num-seqs", "64"),
        ("--max-model-len=4096", "-q", "awq"),
        ("--chat-template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
        ("--tokenizer", "org/other-tokenizer"),
        ("--tokenizer-mode", "slow"),
        ("--chat-template-content-format", "openai"),
        ("--no-trust-remote-code",),
        ("--seed", "-1"),
    ],
)
def test_ordinary_flags_pass(tmp_path: Path, extra: tuple[str, ...]) -> None:
    vllm_check(EngineSpec(model="org/m", extra_args=extra), policy(tmp_path))


def test_tokenizer_under_a_model_root_passes(tmp_path: Path) -> None:
    (tmp_path / "models" / "tok").mkdir(parents=True)
    spec = EngineSpec(model="org/m", extra_args=("--tokenizer", str(tmp_path / "models" / "tok")))
    vllm_check(spec, policy(tmp_path))


def test_worker_build_checks_again_without_a_policy() -> None:
    # The worker re-checks what needs no settings: an owned flag, abbreviated.
    from app.core.models import EngineRecord

    rec = EngineRecord(
        id="e1",
        spec=EngineSpec(model="org/m", extra_args=("--po", "1")),
        host="a",
        address="127.0.0.1",
        port=8100,
    )
    with pytest.raises(ValidationError, match="--port"):
        VllmRuntime().build(rec)


# ------------------------------------------------------------------------ model paths


@pytest.mark.parametrize("model", ["/etc", "~", "../../etc", "./x", "/"])
def test_model_path_outside_the_roots_is_refused(tmp_path: Path, model: str) -> None:
    with pytest.raises(ValidationError) as err:
        vllm_check(EngineSpec(model=model), policy(tmp_path))
    assert err.value.field == "model"
    assert err.value.message.startswith(f"model: {model!r} is outside the allowed model roots (")
    assert str(tmp_path / "models") in err.value.message


def test_symlink_and_dotdot_cannot_escape_a_root(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "link").symlink_to("/etc")
    for model in (str(root / "link"), f"{root}/../../etc", f"{root}/x/../../etc"):
        with pytest.raises(ValidationError, match="outside the allowed model roots"):
            vllm_check(EngineSpec(model=model), policy(tmp_path))


def test_model_under_a_root_and_repo_ids_pass(tmp_path: Path) -> None:
    (tmp_path / "models" / "qwen").mkdir(parents=True)
    for model in (str(tmp_path / "models" / "qwen"), "Qwen/Qwen2.5-7B-Instruct", "gpt2"):
        vllm_check(EngineSpec(model=model), policy(tmp_path))


def test_default_roots_are_the_hf_cache_and_data_dir_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    settings = Settings.from_env({"SAGELLM_DATA_DIR": str(tmp_path / "data")})
    roots = settings.engine_policy().model_roots
    assert str(tmp_path / "hub") in roots
    assert str(tmp_path / "data" / "models") in roots
    given = Settings.from_env({"SAGELLM_MODEL_ROOTS": f"{tmp_path}/a,{tmp_path}/b"})
    assert given.engine_policy().model_roots == (f"{tmp_path}/a", f"{tmp_path}/b")


def test_default_roots_read_the_hub_cache_from_the_environment_given(tmp_path: Path) -> None:
    settings = Settings.from_env({"SAGELLM_DATA_DIR": str(tmp_path / "data")})

    roots = settings.engine_policy({"HF_HOME": str(tmp_path / "hf")}).model_roots

    assert roots[0] == str(tmp_path / "hf" / "hub")


def test_unknown_or_owned_names_in_unsafe_flags_setting_are_a_config_error() -> None:
    for value in ("--trust-remote-cod", "--port"):
        settings = Settings.from_env({"SAGELLM_ENGINE_UNSAFE_FLAGS": value})
        with pytest.raises(ConfigError) as err:
            settings.engine_policy()
        assert err.value.field == "SAGELLM_ENGINE_UNSAFE_FLAGS"


# ------------------------------------------------------------------------ spawn


def test_engine_inherits_the_workers_env_but_not_the_control_planes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import time

    from workers.host import processes
    from workers.runtimes.base import LaunchPlan

    for name in ("SAGELLM_ADMIN_TOKEN", "SAGELLM_REDIS_URL", "CELERY_BROKER_URL"):
        monkeypatch.setenv(name, "secret")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "u:p")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    monkeypatch.setenv("HF_HOME", "/data/hf")  # the operator's: passes through
    plan = LaunchPlan(
        argv=[sys.executable, "-c", "import time; time.sleep(30)"],
        env={"SAGELLM_ENGINE_ID": "eng-env", "SAGELLM_ENGINE_HOST": "a", "OMP_NUM_THREADS": "2"},
    )
    proc = processes.spawn(plan, tmp_path / "eng.log")
    try:
        raw = b""
        for _ in range(100):  # until exec replaced the forked worker's environment
            raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
            if b"SAGELLM_ENGINE_ID=" in raw:
                break
            time.sleep(0.02)
        env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    finally:
        processes.stop(proc.pid, proc.create_time, grace_s=1)
    assert env["SAGELLM_ENGINE_ID"] == "eng-env" and env["SAGELLM_ENGINE_HOST"] == "a"
    assert env["OMP_NUM_THREADS"] == "2" and env["HF_HOME"] == "/data/hf"
    leaked = sorted(
        k
        for k in env
        if k.startswith(("SAGELLM_", "CELERY_", "FLOWER_")) or k == "PROMETHEUS_MULTIPROC_DIR"
    )
    assert leaked == ["SAGELLM_ENGINE_HOST", "SAGELLM_ENGINE_ID"]


# ------------------------------------------------------------------------ own servers


def test_own_servers_refuse_abbreviated_flags() -> None:
    from workers.servers.common import parse_args

    args = parse_args("x", ["--model", "m", "--port", "1", "--device", "cpu"])
    assert args.port == 1
    with pytest.raises(SystemExit):
        parse_args("x", ["--model", "m", "--po", "1", "--device", "cpu"])


# ------------------------------------------------------------------------ the edge


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (
            EngineSpec(model="org/m", required_memory_gb=1, extra_args=("--po", "9999")),
            "extra_args",
        ),
        (EngineSpec(model="org/m", required_memory_gb=1, env={"LD_PRELOAD": "x"}), "env"),
        (EngineSpec(model="/etc", required_memory_gb=1), "model"),
        (EngineSpec(model="org/m", extra_args=("--trust-remote-code",)), "extra_args"),
    ],
)
def test_start_refuses_before_reserving_or_queueing_anything(
    fake_redis: object, tmp_path: Path, spec: EngineSpec, field: str
) -> None:
    from app.services import engines
    from app.services.cluster import Cluster
    from app.state.ledger import Ledger
    from app.state.registry import Registry

    settings = Settings.from_env({"SAGELLM_DATA_DIR": str(tmp_path)})
    cluster = Cluster(settings, Registry(fake_redis), Ledger(fake_redis), None)  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as err:
        engines.start_engine(cluster, spec)  # no worker is alive: a 503 if it got that far
    assert err.value.field == field
    assert cluster.registry.engines() == [] and cluster.ledger.is_empty()


def test_an_unknown_unsafe_flag_setting_stops_the_api_at_start_up() -> None:
    from app import create_app
    from app.core.errors import ConfigError
    from app.settings import Settings

    settings = Settings.from_env({"SAGELLM_ENGINE_UNSAFE_FLAGS": "--port"})
    with pytest.raises(ConfigError, match="SAGELLM_ENGINE_UNSAFE_FLAGS"):
        create_app(settings)
