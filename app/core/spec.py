"""What a user asks for: ``EngineSpec`` and the kinds and runtimes it may name.

Validated once, by ``EngineSpec.validate``. No Redis, Flask or Celery here.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from app.core.engine_policy import check_env
from app.core.errors import ValidationError


class EngineKind(enum.StrEnum):
    LLM = "llm"
    EMBEDDING = "embedding"


DEFAULT_RUNTIME = {EngineKind.LLM: "vllm", EngineKind.EMBEDDING: "embedding"}
RUNTIMES_BY_KIND = {
    EngineKind.LLM: ("vllm", "transformers"),
    EngineKind.EMBEDDING: ("embedding",),
}

# A model is a HF repo id ("Qwen/Qwen2.5-7B-Instruct") or a local path. Argv is never
# built through a shell, but a model string with shell metacharacters is still refused:
# it is always a mistake and would be dangerous in logs copied into a terminal.
_MODEL_RE = re.compile(r"^[A-Za-z0-9_./~+-][A-Za-z0-9_./~+:@=-]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")


@dataclass(frozen=True)
class EngineSpec:
    """What a user asks for. Validated once, here, by ``validate``."""

    model: str
    kind: EngineKind = EngineKind.LLM
    runtime: str | None = None
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    use_gpu: bool | None = None
    required_memory_gb: float | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    quantization: str | None = None
    port: int | None = None
    host: str | None = None
    gpu_ids: tuple[int, ...] | None = None
    label: str | None = None
    served_model_name: str | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    preset: str | None = None
    preset_engine: str | None = None

    @property
    def gpu_count(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel if self.wants_gpu else 0

    @property
    def wants_gpu(self) -> bool:
        if self.use_gpu is None:
            return self.kind is EngineKind.LLM
        return self.use_gpu

    @property
    def effective_runtime(self) -> str:
        return self.runtime or DEFAULT_RUNTIME[self.kind]

    @property
    def name(self) -> str:
        """The name clients use: served name, else the model id."""
        return self.served_model_name or self.model

    def validate(self) -> EngineSpec:
        """Raise ``ValidationError`` naming the field; return self when valid."""
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValidationError("model: required", field="model")
        if len(self.model) > 512 or not _MODEL_RE.match(self.model):
            raise ValidationError(
                f"model: {self.model!r} is not a Hugging Face repo id or a path "
                "(letters, digits and ._-/~+:@= only)",
                field="model",
            )
        if self.runtime is not None and self.runtime not in RUNTIMES_BY_KIND[self.kind]:
            raise ValidationError(
                f"runtime: {self.runtime!r} cannot serve kind {self.kind.value!r}; "
                f"use one of {', '.join(RUNTIMES_BY_KIND[self.kind])}",
                field="runtime",
            )
        for name in ("tensor_parallel", "pipeline_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValidationError(f"{name}: must be an integer >= 1, got {value!r}", field=name)
        if self.required_memory_gb is not None and not self.required_memory_gb > 0:
            raise ValidationError(
                f"required_memory_gb: must be > 0, got {self.required_memory_gb!r}",
                field="required_memory_gb",
            )
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValidationError(
                f"max_model_len: must be >= 16, got {self.max_model_len!r}", field="max_model_len"
            )
        if self.port is not None and not (1 <= self.port <= 65535):
            raise ValidationError(f"port: {self.port} is not a TCP port", field="port")
        if self.gpu_ids is not None:
            if not self.wants_gpu:
                raise ValidationError("gpu_ids: given but the engine uses no GPU", field="gpu_ids")
            if len(set(self.gpu_ids)) != len(self.gpu_ids) or any(i < 0 for i in self.gpu_ids):
                raise ValidationError(
                    f"gpu_ids: must be distinct indices >= 0, got {list(self.gpu_ids)}",
                    field="gpu_ids",
                )
            if len(self.gpu_ids) != self.gpu_count:
                raise ValidationError(
                    f"gpu_ids: {len(self.gpu_ids)} given, tensor_parallel x pipeline_parallel "
                    f"= {self.gpu_count} needed",
                    field="gpu_ids",
                )
        for name in ("label", "served_model_name", "host"):
            value = getattr(self, name)
            if value is not None and not _NAME_RE.match(value):
                raise ValidationError(
                    f"{name}: {value!r} must be 1-128 letters, digits or ._:/- ", field=name
                )
        if not all(isinstance(a, str) for a in self.extra_args):
            raise ValidationError("extra_args: must be a list of strings", field="extra_args")
        check_env(self.env)  # the allow-list: app.core.engine_policy
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["gpu_ids"] = list(self.gpu_ids) if self.gpu_ids is not None else None
        d["extra_args"] = list(self.extra_args)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineSpec:
        """Build from plain data; unknown fields and wrong types are ``ValidationError``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValidationError(f"{unknown[0]}: unknown field", field=unknown[0])
        data = dict(d)
        try:
            data["kind"] = EngineKind(data.get("kind", "llm"))
        except ValueError:
            raise ValidationError(
                f"kind: {data.get('kind')!r} is not one of llm, embedding", field="kind"
            ) from None
        if data.get("gpu_ids") is not None:
            data["gpu_ids"] = tuple(_as_int(v, "gpu_ids") for v in data["gpu_ids"])
        if "extra_args" in data:
            if isinstance(data["extra_args"], str) or data["extra_args"] is None:
                raise ValidationError("extra_args: must be a list of strings", field="extra_args")
            data["extra_args"] = tuple(data["extra_args"])
        for name in ("tensor_parallel", "pipeline_parallel", "port", "max_model_len"):
            if data.get(name) is not None:
                data[name] = _as_int(data[name], name)
        if data.get("required_memory_gb") is not None:
            value = data["required_memory_gb"]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValidationError(
                    f"required_memory_gb: must be a number, got {value!r}",
                    field="required_memory_gb",
                )
        if data.get("env") is not None and not isinstance(data["env"], dict):
            raise ValidationError("env: must be a mapping of names to strings", field="env")
        data["env"] = {str(k): str(v) for k, v in (data.get("env") or {}).items()}
        return cls(**data)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name}: must be an integer, got {value!r}", field=name)
    return value
