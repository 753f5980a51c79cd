"""The one EngineSpec schema: what it accepts, the field each refusal names, and that its
choices come from the enums (the API, presets and the CLI all read them from here)."""

from __future__ import annotations

from typing import Any

import pytest
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from app.core.errors import ValidationError
from app.core.runtimes import RUNTIME_NAMES
from app.core.spec import (
    DTYPES,
    KINDS,
    QUANTIZATIONS,
    SPEC_FIELDS,
    EngineKind,
    EngineSpec,
    EngineSpecSchema,
    load_spec,
)


def refusal(data: Any) -> ValidationError:
    with pytest.raises(ValidationError) as err:
        load_spec(data)
    return err.value


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"model": "m", "tensor_parallel": True}, "tensor_parallel", "must be an integer"),
        ({"model": "m", "tensor_parallel": 1.0}, "tensor_parallel", "must be an integer"),
        ({"model": "m", "tensor_parallel": 65}, "tensor_parallel", "must be an integer <= 64"),
        ({"model": "m", "port": 2**70}, "port", "a number of 71 bits is too large"),
        ({"model": "m", "required_memory_gb": "4"}, "required_memory_gb", "must be a number"),
        ({"model": "m", "required_memory_gb": 0}, "required_memory_gb", "must be a number > 0"),
        ({"model": "m", "max_model_len": 8}, "max_model_len", "must be an integer >= 16"),
        ({"model": "m", "use_gpu": 1}, "use_gpu", "must be true or false, got 1"),
        ({"model": "m", "dtype": "float8"}, "dtype", "'float8' is not one of auto, bfloat16"),
        ({"model": "m", "quantization": "q4"}, "quantization", "'q4' is not one of awq"),
        ({"model": "m", "runtime": "sglang"}, "runtime", "'sglang' is not one of vllm"),
        ({"model": b"m"}, "model", "must be a string"),
        ({"model": ["m"]}, "model", "must be a single value, got list"),
        ({"model": "m", "gpu_ids": [0, "1"]}, "gpu_ids", "gpu_ids[1]: must be an integer"),
        ({"model": "m", "env": {"OMP_NUM_THREADS": True}}, "env", "value must be a string"),
        ({"model": "m", "env": ["A=1"]}, "env", "must be a mapping of names to strings"),
        ({"model": "m", "preset": "p"}, "preset", "unknown field"),
        ({"model": "m", "gpu_idx": [0]}, "gpu_idx", "unknown field (did you mean 'gpu_ids'?)"),
        ({"model": " "}, "model", "required"),
    ],
)
def test_refusals_name_the_field(data: dict[str, Any], field: str, message: str) -> None:
    err = refusal(data)

    assert err.field == field
    assert err.message.startswith(f"{field}"), err.message
    assert message in err.message, err.message


def test_not_a_mapping_is_refused() -> None:
    assert "must be a mapping" in refusal(["model", "m"]).message


def test_a_huge_value_is_quoted_short() -> None:
    err = refusal({"model": "m", "label": "x" * 100_000})

    assert len(err.message) < 300


def test_numbers_in_env_are_their_text_and_defaults_fill_the_rest() -> None:
    spec = load_spec({"model": "org/m", "env": {"OMP_NUM_THREADS": 4}, "gpu_ids": [1]})

    assert spec == EngineSpec(model="org/m", env={"OMP_NUM_THREADS": "4"}, gpu_ids=(1,))
    assert spec.kind is EngineKind.LLM


def test_the_preset_fields_are_set_by_the_loader_only() -> None:
    spec = load_spec({"model": "m"}, preset="p", preset_engine="e")

    assert (spec.preset, spec.preset_engine) == ("p", "e")
    assert "preset" not in SPEC_FIELDS and "model" in SPEC_FIELDS


def test_validate_runs_the_schema_on_a_spec_built_in_code() -> None:
    for spec, field in [
        (EngineSpec(model="m", tensor_parallel=0), "tensor_parallel"),
        (EngineSpec(model="m", port="80"), "port"),  # type: ignore[arg-type]
        (EngineSpec(model="m", label="a b"), "label"),
        (EngineSpec(model="m", dtype="fp4"), "dtype"),
    ]:
        with pytest.raises(ValidationError) as err:
            spec.validate()
        assert err.value.field == field
    ok = EngineSpec(model="m", preset="p", preset_engine="e")
    assert ok.validate() is ok


def test_from_dict_trusts_what_the_control_plane_wrote() -> None:
    # A stored record must load even if today's rules would refuse its spec.
    stored = EngineSpec(model="m", env={"CUDA_VISIBLE_DEVICES": "0"}).to_dict()

    back = EngineSpec.from_dict(stored)

    assert back.env == {"CUDA_VISIBLE_DEVICES": "0"} and back.kind is EngineKind.LLM
    with pytest.raises(ValidationError):
        back.validate()


def _openapi_properties() -> dict[str, Any]:
    spec = APISpec("t", "1", "3.0.3", plugins=[MarshmallowPlugin()])
    spec.components.schema("EngineSpec", schema=EngineSpecSchema)
    props: dict[str, Any] = spec.to_dict()["components"]["schemas"]["EngineSpec"]["properties"]
    return props


def test_choices_come_from_the_enums_and_are_documented() -> None:
    props = _openapi_properties()

    assert tuple(k.value for k in EngineKind) == KINDS
    assert props["kind"]["enum"] == list(KINDS)
    assert props["runtime"]["enum"][:-1] == list(RUNTIME_NAMES)  # and null
    assert props["dtype"]["enum"] == list(DTYPES)
    assert props["quantization"]["enum"][:-1] == list(QUANTIZATIONS)
    assert (props["tensor_parallel"]["minimum"], props["tensor_parallel"]["maximum"]) == (1, 64)
    assert props["label"]["pattern"]
    assert props["preset"]["readOnly"] is True
