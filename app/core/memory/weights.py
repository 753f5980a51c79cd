"""How many bytes an engine's weights take on its GPUs, and where that figure came from.

In order of preference: the checkpoint's safetensors (what is stored is what the GPU
holds, unless vLLM quantizes or casts at load time), the architecture in its config
(``ModelFacts.linears``), or a parameter count in the model's name ("7B").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from app.core.errors import ValidationError
from app.core.memory.facts import (
    DTYPE_BYTES,
    ModelFacts,
    Quantization,
    facts_from_config,
)

Source = Literal["explicit", "safetensors", "config", "name"]


# ---------------------------------------------------------------------------- dtypes


def checkpoint_dtype_bytes(facts: ModelFacts | None) -> int | None:
    """Bytes per weight as the checkpoint stores them (its torch_dtype); None: unknown."""
    if facts is None or not facts.dtype:
        return None
    return DTYPE_BYTES.get(facts.dtype.lower())


def dtype_bytes(dtype: str, facts: ModelFacts | None) -> int:
    """Bytes per weight (and KV element) that vLLM will use for ``dtype``."""
    key = dtype.lower()
    if key == "auto":
        stored = checkpoint_dtype_bytes(facts)
        # vLLM's "auto" runs float32 checkpoints in 16 bits; unknown dtype: 16 bits too.
        return 2 if stored is None or stored > 2 else stored
    if key not in DTYPE_BYTES:
        raise ValidationError(
            f"dtype: {dtype!r} is not one of auto, {', '.join(sorted(DTYPE_BYTES))}",
            field="dtype",
        )
    return DTYPE_BYTES[key]


# ---------------------------------------------------------------------------- quantization


def quantization(facts: ModelFacts | None, requested: str | None) -> Quantization | None:
    """The checkpoint's quantization (its config wins), else the requested one, else None.

    Raises ``ValidationError`` for a method whose storage we cannot compute.
    """
    if facts is not None and facts.quantization:
        if facts.quant is None:
            raise unknown_size(
                f"quantization method {facts.quantization!r} is not one the memory estimate knows"
            )
        return facts.quant
    if requested is None:
        return None
    method = requested.lower().replace("-", "_")
    if method in ("awq", "awq_marlin", "gptq", "gptq_marlin", "marlin"):
        # Needs a pre-quantized checkpoint; its config is unknown here: the usual 4-bit, g128.
        return Quantization(method, bits=4, group_size=128, zero_bits=4)
    if method in ("fp8", "ptpc_fp8", "fbgemm_fp8"):
        # vLLM quantizes 16-bit weights to fp8 at load time, one fp32 scale per channel.
        return Quantization(method, bits=8, group_size=None, scale_bytes=4)
    if method == "bitsandbytes":
        # In-flight bitsandbytes: 4-bit NF4, one fp32 absmax per 64 weights.
        return Quantization(method, bits=4, group_size=64, scale_bytes=4)
    raise unknown_size(f"quantization {requested!r} is not one the memory estimate knows")


def _quantization_from_name(model: str) -> Quantization | None:
    name = model.lower()
    if re.search(r"awq|gptq|int4|4bit|w4a16|nf4", name):
        return Quantization("name", bits=4, group_size=128)
    if re.search(r"fp8|int8|8bit|w8a8", name):
        return Quantization("name", bits=8, group_size=None)
    return None


# ---------------------------------------------------------------------------- architecture


def config_weights(facts: ModelFacts, quant: Quantization | None, dtype_bytes: int) -> int | None:
    """Weight bytes computed from the config's shapes; None when the architecture is
    not modelled (see ``facts._layer_shapes`` for what is counted). Embeddings count
    once, plus lm_head unless tied; plus the final norm."""
    if not facts.linears or facts.layers is None or facts.hidden_size is None:
        return None
    if quant is None:
        linear = sum(n_in * n_out * k for n_in, n_out, k in facts.linears) * dtype_bytes
        dense_bytes = dtype_bytes
    else:
        linear = sum(quant.matrix_bytes(n_in, n_out) * k for n_in, n_out, k in facts.linears)
        dense_bytes = 2  # embeddings, norms, biases stay 16-bit
    other = facts.layer_other_params * dense_bytes
    return (
        facts.layers * (linear + other) + (facts.embedding_params + facts.hidden_size) * dense_bytes
    )


def parameter_count(config: Mapping[str, Any]) -> int | None:
    """Parameters of a decoder-only transformer from its config.json, or None.

    None for configs lacking the sizes we need and for architectures this does not
    model (multi-head latent attention).
    """
    return facts_from_config(config).param_count


# ---------------------------------------------------------------------------- names


# "7B", "1.5B", "0.5b", "350M", "8x7B" (MoE: 8 x 7e9), delimited by - _ . / or the ends.
_PARAMS_IN_NAME = re.compile(
    r"(?:^|[-_./ ])(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?=$|[-_./ ])", re.IGNORECASE
)
_UNIT = {"b": 1e9, "m": 1e6}


def parameter_count_from_name(model: str) -> int | None:
    """A parameter count stated in a model's name ("Qwen2.5-7B-Instruct" -> 7e9), or None.

    The largest figure wins when several appear ("Qwen3-30B-A3B" -> 30e9: every expert
    must be in memory). "8x7B" counts 56e9, an upper bound for Mixtral-style MoE.
    """
    name = model.rstrip("/").rsplit("/", 1)[-1]
    counts = [
        int(float(size) * _UNIT[unit.lower()] * int(experts or 1))
        for experts, size, unit in _PARAMS_IN_NAME.findall(name)
    ]
    return max(counts) if counts else None


# ---------------------------------------------------------------------------- the figure


def llm_weights(
    model: str,
    facts: ModelFacts | None,
    *,
    dtype: str,
    quantization_requested: str | None,
) -> tuple[int, Source]:
    """Total weight bytes of an LLM engine (all GPUs) and where the figure came from."""
    target = dtype_bytes(dtype, facts)
    prequantized = facts is not None and bool(facts.quantization)

    # 1. safetensors: what the checkpoint stores is what the GPU holds, unless vLLM
    # quantizes at load time (a quantization asked for on a 16-bit checkpoint) or casts
    # to another width. Any pre-quantized format counts, even one ``quantization`` can't
    # model (mxfp4...).
    if facts is not None and (prequantized or quantization_requested is None):
        stored = facts.weights_bytes
        if stored:
            checkpoint = checkpoint_dtype_bytes(facts)
            if not prequantized and checkpoint and checkpoint != target:
                stored = stored * target // checkpoint
            return stored, "safetensors"

    quant = quantization(facts, quantization_requested)

    # 2. config.json architecture.
    if facts is not None:
        computed = config_weights(facts, quant, target)
        if computed:
            return computed, "config"

    # 3. the name: params x bytes per param. Quantized: bits/8 + 0.25 byte, which
    # covers 16-bit embeddings and group scales (Qwen2.5-7B-AWQ stores 0.73 B/param,
    # Llama-2-7B-AWQ 0.58).
    params = parameter_count_from_name(model)
    if params:
        quant = quant or _quantization_from_name(model)
        per_param = target if quant is None else quant.bits / 8 + 0.25
        return math.ceil(params * per_param), "name"

    raise unknown_size(
        f"the size of model {model!r} is unknown: no host has its files on disk (a local "
        "directory or a worker's Hugging Face cache), and its name states no parameter count"
    )


def embedding_weights(model: str, facts: ModelFacts | None, *, dtype: str) -> tuple[int, Source]:
    """Weight bytes of a sentence-transformers server, or (0, "explicit") when unknown.

    The checkpoint's file sizes as stored when ``dtype`` is "auto", else scaled to
    ``dtype``; without files, the name's parameter count at 4 bytes
    (sentence-transformers loads float32 by default) or at ``dtype``.
    """
    if facts is not None and facts.file_bytes:
        stored = checkpoint_dtype_bytes(facts)
        size = facts.file_bytes
        if dtype.lower() != "auto" and stored:
            size = size * dtype_bytes(dtype, facts) // stored
        return size, "safetensors"
    if params := parameter_count_from_name(model):
        per_param = 4 if dtype.lower() == "auto" else dtype_bytes(dtype, facts)
        return params * per_param, "name"
    return 0, "explicit"


def unknown_size(reason: str) -> ValidationError:
    return ValidationError(
        f"required_memory_gb: {reason}; pass required_memory_gb (GiB per GPU)",
        field="required_memory_gb",
    )
