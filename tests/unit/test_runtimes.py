"""Runtimes build the argv and environment a placed engine is started with."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from app.core.engine_policy import ENGINE_HOST_ENV, ENGINE_OWNER_ENV, RESERVED_ENV
from app.core.errors import ValidationError
from app.core.inventory_spec import mock_uuid
from app.core.models import EngineRecord, GpuAssignment
from app.core.runtimes import OWNED_FLAGS, RUNTIME_NAMES, RUNTIMES_BY_KIND
from app.core.spec import EngineKind, EngineSpec
from workers.runtimes import RUNTIMES, RuntimeUnavailable, engine_env, get_runtime
from workers.runtimes import vllm as vllm_runtime
from workers.runtimes.embedding import EmbeddingRuntime
from workers.runtimes.transformers import TransformersRuntime
from workers.runtimes.vllm import VllmRuntime

FAKES = Path(__file__).resolve().parents[1] / "fakes"
UUID0, UUID1 = mock_uuid("a", 0), mock_uuid("a", 1)


@pytest.fixture(autouse=True)
def fake_vllm_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ.get('PATH', '')}")


def placed(spec: EngineSpec, *, gpus: int = 0, **fields: object) -> EngineRecord:
    values: dict[str, object] = {
        "host": "a",
        "address": "10.0.0.5",
        "port": 8123,
        "gpus": [GpuAssignment(i, mock_uuid("a", i), 20_000) for i in range(gpus)],
        **fields,
    }
    return EngineRecord(id="eng-1", spec=spec, **values)  # type: ignore[arg-type]


def flag(argv: list[str], name: str) -> str | None:
    """The value after ``name`` in ``argv``; None when absent; fails if repeated."""
    assert argv.count(name) <= 1, f"{name} appears twice in {argv}"
    return argv[argv.index(name) + 1] if name in argv else None


# ------------------------------------------------------------------------ registry


def test_registry_has_each_runtime_under_its_name() -> None:
    assert sorted(RUNTIMES) == ["embedding", "transformers", "vllm"]
    assert isinstance(get_runtime("vllm"), VllmRuntime)
    assert isinstance(get_runtime("embedding"), EmbeddingRuntime)
    assert isinstance(get_runtime("transformers"), TransformersRuntime)


def test_the_workers_runtimes_are_the_ones_the_api_knows() -> None:
    # app.core.runtimes is what the API checks specs with, without importing workers.
    assert set(RUNTIMES) == set(RUNTIME_NAMES)
    assert {r for names in RUNTIMES_BY_KIND.values() for r in names} == set(RUNTIME_NAMES)
    for name, runtime in RUNTIMES.items():
        assert runtime.owned_flags is OWNED_FLAGS[name]


def test_engine_env_tags_and_pins_with_the_names_the_policy_reserves() -> None:
    env = engine_env(placed(EngineSpec(model="org/m")))

    # the worker adds its own tags
    assert set(RESERVED_ENV) - set(env) == {ENGINE_HOST_ENV, ENGINE_OWNER_ENV}


def test_unknown_runtime_is_a_validation_error_listing_known_ones() -> None:
    with pytest.raises(ValidationError) as err:
        get_runtime("sglang")
    assert err.value.field == "runtime"
    assert "'sglang'" in err.value.message
    assert "embedding, transformers, vllm" in err.value.message


# ------------------------------------------------------------------------ vLLM


def test_vllm_argv_has_placement_launch_flags_and_served_name() -> None:
    spec = EngineSpec(
        model="Qwen/Qwen2.5-7B-Instruct",
        served_model_name="qwen",
        tensor_parallel=2,
        pipeline_parallel=1,
    )
    rec = placed(spec, gpus=2, launch={"gpu_memory_utilization": 0.4213, "max_model_len": 8192})
    argv = VllmRuntime().build(rec).argv

    assert argv[0] == str(FAKES / "vllm")  # resolved on PATH at build time, absolute
    assert argv[1:3] == ["serve", "Qwen/Qwen2.5-7B-Instruct"]
    assert flag(argv, "--host") == "10.0.0.5"
    assert flag(argv, "--port") == "8123"
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert flag(argv, "--pipeline-parallel-size") == "1"
    assert flag(argv, "--served-model-name") == "qwen"
    assert flag(argv, "--gpu-memory-utilization") == "0.421"
    assert flag(argv, "--max-model-len") == "8192"
    assert flag(argv, "--dtype") is None  # "auto" is vLLM's default: not passed
    assert flag(argv, "--quantization") is None


def test_vllm_served_name_defaults_to_model_and_launch_flags_are_optional() -> None:
    rec = placed(EngineSpec(model="meta-llama/Llama-3.1-8B-Instruct"), gpus=1)
    argv = VllmRuntime().build(rec).argv
    assert flag(argv, "--served-model-name") == "meta-llama/Llama-3.1-8B-Instruct"
    assert flag(argv, "--gpu-memory-utilization") is None
    assert flag(argv, "--max-model-len") is None


def test_vllm_dtype_quantization_and_extra_args_in_order() -> None:
    spec = EngineSpec(
        model="Qwen/Qwen2.5-7B-Instruct-AWQ",
        dtype="float16",
        quantization="awq",
        extra_args=("--enforce-eager", "--max-num-seqs", "64"),
    )
    argv = VllmRuntime().build(placed(spec, gpus=1)).argv
    assert flag(argv, "--dtype") == "float16"
    assert flag(argv, "--quantization") == "awq"
    assert argv[-3:] == ["--enforce-eager", "--max-num-seqs", "64"]  # verbatim, last


@pytest.mark.parametrize(
    "extra",
    [
        ("--max-model-len", "4096"),
        ("--max-model-len=4096",),
        ("--max_model_len", "4096"),  # vLLM accepts underscores too
    ],
)
def test_vllm_user_max_model_len_wins_and_ours_is_dropped(extra: tuple[str, ...]) -> None:
    spec = EngineSpec(model="Qwen/Qwen2.5-1.5B-Instruct", extra_args=extra)
    rec = placed(spec, gpus=1, launch={"gpu_memory_utilization": 0.3, "max_model_len": 32768})
    argv = VllmRuntime().build(rec).argv
    assert "32768" not in argv
    assert argv[-len(extra) :] == list(extra)
    assert flag(argv, "--gpu-memory-utilization") == "0.300"  # the other flag is kept


def test_vllm_user_gpu_memory_utilization_and_quantization_alias_win() -> None:
    spec = EngineSpec(
        model="Qwen/Qwen2.5-7B-Instruct-AWQ",
        quantization="awq",
        extra_args=("--gpu-memory-utilization=0.9", "-q", "awq_marlin"),
    )
    rec = placed(spec, gpus=1, launch={"gpu_memory_utilization": 0.3})
    argv = VllmRuntime().build(rec).argv
    assert "0.300" not in argv
    assert "--quantization" not in argv
    assert argv[-3:] == ["--gpu-memory-utilization=0.9", "-q", "awq_marlin"]


@pytest.mark.parametrize(
    ("extra", "field_hint"),
    [
        (("--port", "9000"), "port"),
        (("--port=9000",), "port"),
        (("--host", "0.0.0.0"), "SAGELLM_HOST_ADDRESS"),
        (("-tp", "4"), "tensor_parallel"),
        (("--tensor_parallel_size", "4"), "tensor_parallel"),
        (("--pipeline-parallel-size", "2"), "pipeline_parallel"),
        (("--served-model-name", "x"), "served_model_name"),
    ],
)
def test_vllm_refuses_extra_args_that_set_placement_owned_flags(
    extra: tuple[str, ...], field_hint: str
) -> None:
    spec = EngineSpec(model="Qwen/Qwen2.5-1.5B-Instruct", extra_args=extra)
    with pytest.raises(ValidationError) as err:
        VllmRuntime().build(placed(spec, gpus=1))
    assert err.value.field == "extra_args"
    assert field_hint in err.value.message
    with pytest.raises(ValidationError):
        VllmRuntime().validate(spec)  # also callable at the API edge, before placement


@pytest.mark.parametrize(
    ("extra", "owned"),
    [
        (("--po", "9000"), "--port"),
        (("--ho=0.0.0.0",), "--host"),
        (("--served", "x"), "--served-model-name"),
        (("--tensor-p", "8"), "--tensor-parallel-size"),
    ],
)
def test_vllm_refuses_owned_flags_abbreviated_as_argparse_would_read_them(
    extra: tuple[str, ...], owned: str
) -> None:
    spec = EngineSpec(model="Qwen/Qwen2.5-1.5B-Instruct", extra_args=extra)
    with pytest.raises(ValidationError) as err:
        VllmRuntime().build(placed(spec, gpus=1))
    assert err.value.field == "extra_args" and owned in err.value.message


def test_worker_build_with_its_policy_refuses_a_model_outside_the_roots(tmp_path: Path) -> None:
    from app.core.engine_policy import EnginePolicy

    pol = EnginePolicy(model_roots=(str(tmp_path),))
    with pytest.raises(ValidationError) as err:
        VllmRuntime().build(placed(EngineSpec(model="/etc"), gpus=1), pol)
    assert err.value.field == "model"
    (tmp_path / "m").mkdir()
    VllmRuntime().build(placed(EngineSpec(model=str(tmp_path / "m")), gpus=1), pol)


def test_own_server_pythonpath_is_the_checkout_then_the_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/opt/site")
    plan = EmbeddingRuntime().build(placed(EngineSpec(model="org/m", kind=EngineKind.EMBEDDING)))
    assert plan.env["PYTHONPATH"].split(os.pathsep) == [
        str(Path(__file__).resolve().parents[2]),
        "/opt/site",
    ]


def test_vllm_missing_executable_is_runtime_unavailable_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(vllm_runtime.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(RuntimeUnavailable, match="'vllm' not found"):
        VllmRuntime().build(placed(EngineSpec(model="Qwen/Qwen2.5-1.5B-Instruct"), gpus=1))


def test_vllm_model_with_spaces_stays_one_argv_element() -> None:
    # Validation refuses such a model at the edge; the runtime still never uses a shell.
    spec = EngineSpec(model="/models/my model; rm -rf ~")
    argv = VllmRuntime().build(placed(spec, gpus=1)).argv
    assert isinstance(argv, list)
    assert argv[2] == "/models/my model; rm -rf ~"


def test_unplaced_record_cannot_be_built() -> None:
    rec = placed(EngineSpec(model="Qwen/Qwen2.5-1.5B-Instruct"), gpus=1, address=None)
    with pytest.raises(ValidationError) as err:
        VllmRuntime().build(rec)
    assert err.value.field == "address"


# ------------------------------------------------------------------------ environment


def test_env_pins_gpus_by_uuid_in_assignment_order_and_tags_the_engine() -> None:
    rec = placed(EngineSpec(model="Qwen/Qwen2.5-7B-Instruct", tensor_parallel=2), gpus=2)
    env = VllmRuntime().build(rec).env
    assert env["CUDA_VISIBLE_DEVICES"] == f"{UUID0},{UUID1}"
    assert UUID0.startswith("GPU-")
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["SAGELLM_ENGINE_ID"] == "eng-1"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_env_hides_every_gpu_from_an_engine_without_gpus() -> None:
    spec = EngineSpec(model="BAAI/bge-small-en-v1.5", kind=EngineKind.EMBEDDING)
    env = EmbeddingRuntime().build(placed(spec)).env
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["SAGELLM_ENGINE_ID"] == "eng-1"


def test_user_env_is_added_but_cannot_override_pinning_or_tag() -> None:
    spec = EngineSpec(
        model="Qwen/Qwen2.5-1.5B-Instruct",
        env={
            "HF_HUB_OFFLINE": "1",
            "VLLM_LOGGING_LEVEL": "DEBUG",
            "CUDA_DEVICE_ORDER": "FASTEST_FIRST",
            "PYTHONUNBUFFERED": "0",
        },
    )
    # Validation refuses these two; engine_env must hold even for an unvalidated spec.
    spec.env.update({"SAGELLM_ENGINE_ID": "someone-else", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    env = engine_env(placed(spec, gpus=1))
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert env["PYTHONUNBUFFERED"] == "0"  # a preference, the user's to choose
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["SAGELLM_ENGINE_ID"] == "eng-1"
    assert env["CUDA_VISIBLE_DEVICES"] == UUID0


def test_worker_environment_is_not_copied_into_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    # The plan holds only what we add; spawn lays it over the worker's environment.
    monkeypatch.setenv("HF_HOME", "/data/hf")
    env = engine_env(placed(EngineSpec(model="Qwen/Qwen2.5-1.5B-Instruct"), gpus=1))
    assert "HF_HOME" not in env


# ------------------------------------------------------------------------ own servers


@pytest.mark.parametrize(
    ("runtime", "module"),
    [
        (EmbeddingRuntime(), "workers.servers.embedding"),
        (TransformersRuntime(), "workers.servers.transformers"),
    ],
)
@pytest.mark.parametrize(("gpus", "device"), [(0, "cpu"), (1, "cuda")])
def test_own_server_argv(
    runtime: EmbeddingRuntime | TransformersRuntime, module: str, gpus: int, device: str
) -> None:
    spec = EngineSpec(
        model="sentence-transformers/all-MiniLM-L6-v2",
        served_model_name="minilm",
        extra_args=("--batch-size", "16"),
    )
    plan = runtime.build(placed(spec, gpus=gpus))
    assert plan.argv == [
        sys.executable,
        "-m",
        module,
        "--model",
        "sentence-transformers/all-MiniLM-L6-v2",
        "--host",
        "10.0.0.5",
        "--port",
        "8123",
        "--served-model-name",
        "minilm",
        "--device",
        device,
        "--batch-size",
        "16",
    ]
    assert plan.env["CUDA_VISIBLE_DEVICES"] == (UUID0 if gpus else "")
    root = str(Path(__file__).resolve().parents[2])
    assert plan.env["PYTHONPATH"].split(os.pathsep)[0] == root


@pytest.mark.parametrize("extra", [("--device", "cuda"), ("--port=1",), ("--model", "x")])
def test_own_server_refuses_placement_owned_flags(extra: tuple[str, ...]) -> None:
    spec = EngineSpec(model="sentence-transformers/all-MiniLM-L6-v2", extra_args=extra)
    with pytest.raises(ValidationError) as err:
        EmbeddingRuntime().build(placed(spec))
    assert err.value.field == "extra_args"


# ------------------------------------------------------------------------ readiness


def probe_with(handler: object, spec: EngineSpec | None = None) -> tuple[bool, str]:
    rec = placed(spec or EngineSpec(model="Qwen/Qwen2.5-1.5B-Instruct", served_model_name="q"))
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:  # type: ignore[arg-type]
        r = VllmRuntime().probe(rec, client, timeout_s=1.0)
    return r.ready, r.detail


def test_probe_ready_when_health_ok_and_models_list_served_name() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        assert str(req.url).startswith("http://10.0.0.5:8123/")
        if req.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, json={"object": "list", "data": [{"id": "q"}]})

    assert probe_with(handler) == (True, "")


def test_probe_not_ready_while_models_lack_served_name() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, json={"object": "list", "data": [{"id": "other"}]})

    ready, detail = probe_with(handler)
    assert not ready
    assert "does not list 'q'" in detail


def test_probe_not_ready_on_health_error_or_refused_connection() -> None:
    assert probe_with(lambda req: httpx.Response(503)) == (False, "/health answered 503")

    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=req)

    assert probe_with(refuse) == (False, "not listening yet")
