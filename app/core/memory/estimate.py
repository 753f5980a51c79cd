"""How much GPU memory an engine needs, from a model's facts.

Per GPU, an LLM engine needs

    weights / (tensor_parallel x pipeline_parallel)
  + KV cache for one full sequence of ``max_model_len`` tokens
  + runtime overhead (CUDA context, CUDA graphs, peak activations)
  + rounding headroom (so that --gpu-memory-utilization, rounded down, still covers it)

The facts come from a host that has the model's files (``ModelFacts``, measured by its
worker); without them the weights come from a parameter count in the name ("7B").
An explicit ``required_memory_gb`` overrides the estimate. Units are MiB (ints);
1 GiB = 1024 MiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.core.errors import ValidationError
from app.core.memory.facts import MIB, ModelFacts
from app.core.memory.kv_cache import heuristic_kv_bytes_per_token, kv_bytes_per_token, kv_tokens
from app.core.memory.weights import (
    Source,
    dtype_bytes,
    embedding_weights,
    llm_weights,
    parameter_count_from_name,
    unknown_size,
)

# Overhead per GPU of a vLLM engine beyond weights and KV cache.
# - 1.5 GiB fixed: CUDA context and cuBLAS/NCCL workspaces (~0.5 GiB), CUDA graphs
#   captured for decode batch sizes (~0.5-1 GiB), sampler/logits buffers.
# - plus 5% of the weights on that GPU: vLLM's profiler run reserves the peak activation
#   memory of a max_num_batched_tokens forward pass, which grows with hidden and
#   intermediate sizes, i.e. with model size. 5% matches what vLLM reports for 1.5B-8B
#   models (a few hundred MiB to ~1 GiB of activations).
BASE_OVERHEAD_MIB = 1536
OVERHEAD_WEIGHTS_PERCENT = 5

# --gpu-memory-utilization is rounded DOWN to 3 decimals (see ``vllm_fit_flags``), which
# loses up to 0.001 x GPU total of the reservation. The estimate carries that much extra
# so that the length it was made for still fits after rounding: 192 MiB covers GPUs up
# to 192,000 MiB (B200-class); on smaller GPUs the excess goes to the KV cache.
ROUNDING_HEADROOM_MIB = 192

# Embedding servers (sentence-transformers): CUDA context (~0.5 GiB) plus activations of
# an encode batch; 10% of the weights for the latter because batches of 512-token inputs
# through a wide encoder scale with its width.
EMBEDDING_BASE_OVERHEAD_MIB = 1024
EMBEDDING_OVERHEAD_WEIGHTS_PERCENT = 10


@dataclass(frozen=True)
class MemoryEstimate:
    """What an engine needs on each of its GPUs, and how that figure was reached."""

    model: str
    per_gpu_mib: int  # the total to reserve on each GPU
    weights_mib_per_gpu: int
    kv_cache_mib_per_gpu: int
    overhead_mib: int
    headroom_mib: int  # rounding headroom for --gpu-memory-utilization
    kv_bytes_per_token_per_gpu: int  # 0 when unknown (explicit size, unknown model)
    max_model_len: int  # the length the estimate was made for (0: not an LLM)
    model_max_len: int | None  # the model's own maximum, when its config is known
    source: Source
    weights_bytes: int = 0  # all weights, all GPUs together; 0 when unknown
    max_model_len_requested: bool = False  # the caller asked for max_model_len
    note: str = ""  # where the facts came from ("measured on host b"), or why none did

    def explain(self) -> str:
        """One line a person can read: where each GiB of the reservation goes."""
        name = short_name(self.model)
        kv = f" + {gib(self.kv_cache_mib_per_gpu)} KV ({self.max_model_len} tokens)"
        if self.max_model_len == 0:
            kv = ""
        parts = (
            f"{gib(self.weights_mib_per_gpu)} weights{kv}"
            f" + {gib(self.overhead_mib)} overhead"
            f" + {gib(self.headroom_mib)} headroom"
        )
        if self.source == "explicit":
            estimated = self.weights_mib_per_gpu + self.kv_cache_mib_per_gpu + self.overhead_mib
            if estimated == 0:
                return f"{name}: {gib(self.per_gpu_mib)} per GPU (required_memory_gb)"
            return (
                f"{name}: {gib(self.per_gpu_mib)} per GPU (required_memory_gb; "
                f"estimate was {parts} = {gib(estimated + self.headroom_mib)})"
            )
        note = f"; {self.note}" if self.note else ""
        return f"{name}: {parts} = {gib(self.per_gpu_mib)} per GPU (size from {self.source}{note})"


def estimate_memory(
    model: str,
    *,
    facts: ModelFacts | None = None,
    dtype: str = "auto",
    quantization: str | None = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    max_model_len: int | None = None,
    required_memory_gb: float | None = None,
    default_max_model_len: int = 32768,
) -> MemoryEstimate:
    """Memory per GPU of a vLLM engine serving ``model`` (repo id or local path), from
    ``facts`` measured on a host that has its files (None: no host has them).

    Weights from safetensors, else the config's architecture, else the name's parameter
    count; plus KV cache for one sequence of ``max_model_len`` tokens (default: the
    model's maximum capped at ``default_max_model_len``); plus overhead and rounding
    headroom. Weights per GPU are the total divided by tensor_parallel x
    pipeline_parallel: vLLM shards every layer, the vocabulary included, across ranks;
    the replicated norms are negligible.

    ``required_memory_gb`` overrides the figure (source "explicit"); the breakdown is
    still filled when the model is known, so that ``vllm_fit_flags`` can size the KV cache.

    Raises ``ValidationError``: ``max_model_len`` above the model's maximum; or the size
    is unknown (no facts, no size in the name) and ``required_memory_gb`` is not given.
    """
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise ValidationError(
            "tensor_parallel and pipeline_parallel must be >= 1", field="tensor_parallel"
        )
    own_max = facts.max_len if facts is not None else None
    if max_model_len is not None and own_max is not None and max_model_len > own_max:
        raise ValidationError(
            f"max_model_len: {max_model_len} is above {short_name(model)}'s maximum of "
            f"{own_max} tokens",
            field="max_model_len",
        )
    length = max_model_len or min(own_max or default_max_model_len, default_max_model_len)
    explicit_mib = None if required_memory_gb is None else round(required_memory_gb * 1024)

    source: Source
    try:
        weights_bytes, source = llm_weights(
            model, facts, dtype=dtype, quantization_requested=quantization
        )
    except ValidationError as err:
        if explicit_mib is None or err.field != "required_memory_gb":
            raise
        weights_bytes, source = 0, "explicit"

    gpus = tensor_parallel * pipeline_parallel
    kv_dtype_bytes = dtype_bytes(dtype, facts)
    kv_per_token = None
    if facts is not None:
        kv_per_token = kv_bytes_per_token(
            facts,
            kv_dtype_bytes=kv_dtype_bytes,
            tensor_parallel=tensor_parallel,
            pipeline_parallel=pipeline_parallel,
        )
    if kv_per_token is None and weights_bytes:
        params = parameter_count_from_name(model) or weights_bytes // kv_dtype_bytes
        kv_per_token = math.ceil(heuristic_kv_bytes_per_token(params, kv_dtype_bytes) / gpus)
    kv_per_token = kv_per_token or 0
    weights_mib = math.ceil(weights_bytes / gpus / MIB)
    kv_mib = math.ceil(kv_per_token * kv_tokens(length) / MIB)
    overhead = 0 if weights_bytes == 0 else _overhead_mib(weights_mib)
    estimated = weights_mib + kv_mib + overhead + ROUNDING_HEADROOM_MIB
    return MemoryEstimate(
        model=model,
        per_gpu_mib=estimated if explicit_mib is None else explicit_mib,
        weights_mib_per_gpu=weights_mib,
        kv_cache_mib_per_gpu=kv_mib,
        overhead_mib=overhead,
        headroom_mib=ROUNDING_HEADROOM_MIB,
        kv_bytes_per_token_per_gpu=kv_per_token,
        max_model_len=length,
        model_max_len=own_max,
        source="explicit" if explicit_mib is not None else source,
        weights_bytes=weights_bytes,
        max_model_len_requested=max_model_len is not None,
    )


def _overhead_mib(weights_mib_per_gpu: int) -> int:
    return BASE_OVERHEAD_MIB + math.ceil(weights_mib_per_gpu * OVERHEAD_WEIGHTS_PERCENT / 100)


def estimate_embedding_memory(
    model: str,
    *,
    facts: ModelFacts | None = None,
    dtype: str = "auto",
    required_memory_gb: float | None = None,
) -> MemoryEstimate:
    """Memory of a sentence-transformers embedding server on one GPU.

    Weights: the checkpoint's file sizes (``ModelFacts.file_bytes``), else the name's
    parameter count (see ``weights.embedding_weights``). Plus 1 GiB + 10% of weights of
    overhead and the rounding headroom; no KV cache.
    """
    explicit_mib = None if required_memory_gb is None else round(required_memory_gb * 1024)
    weights_bytes, source = embedding_weights(model, facts, dtype=dtype)
    if weights_bytes == 0 and explicit_mib is None:
        raise unknown_size(
            f"the size of embedding model {model!r} is unknown: no host has its files on "
            "disk (a local directory or a worker's Hugging Face cache), and its name states "
            "no parameter count"
        )
    weights_mib = math.ceil(weights_bytes / MIB)
    overhead = 0
    if weights_bytes:
        overhead = EMBEDDING_BASE_OVERHEAD_MIB + math.ceil(
            weights_mib * EMBEDDING_OVERHEAD_WEIGHTS_PERCENT / 100
        )
    return MemoryEstimate(
        model=model,
        per_gpu_mib=(
            weights_mib + overhead + ROUNDING_HEADROOM_MIB if explicit_mib is None else explicit_mib
        ),
        weights_mib_per_gpu=weights_mib,
        kv_cache_mib_per_gpu=0,
        overhead_mib=overhead,
        headroom_mib=ROUNDING_HEADROOM_MIB,
        kv_bytes_per_token_per_gpu=0,
        max_model_len=0,
        model_max_len=facts.max_len if facts is not None else None,
        source="explicit" if explicit_mib is not None else source,
        weights_bytes=weights_bytes,
    )


def estimate_on_disk(facts: ModelFacts, *, default_max_model_len: int) -> MemoryEstimate:
    """What a host's model would need with default settings: a sentence-transformers
    directory as an embedding server, anything else as a vLLM engine at the model's
    maximum length capped at ``default_max_model_len``, one GPU, dtype auto."""
    if facts.sentence_transformers:
        return estimate_embedding_memory(facts.model, facts=facts)
    return estimate_memory(facts.model, facts=facts, default_max_model_len=default_max_model_len)


# ---------------------------------------------------------------------------- formatting


def gib(mib: int) -> str:
    return f"{mib / 1024:.1f} GiB"


def short_name(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1] or model
