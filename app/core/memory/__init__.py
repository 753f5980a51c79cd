"""How much GPU memory an engine needs, and the vLLM flags that keep it inside that.

Pure arithmetic over a model's facts (``ModelFacts``), which each worker measures from
the files on its own host (``workers.host.model_facts``) and publishes. Nothing here
reads a file or the environment.

* ``facts``: ``ModelFacts`` and the parsers of config.json and safetensors headers
* ``weights``: weight bytes (safetensors, config arithmetic, or the name)
* ``kv_cache``: KV cache bytes per token
* ``estimate``: ``MemoryEstimate``, ``estimate_memory``, ``estimate_embedding_memory``
* ``fit``: ``vllm_fit_flags``
"""

from __future__ import annotations

from app.core.memory.estimate import (
    BASE_OVERHEAD_MIB,
    EMBEDDING_BASE_OVERHEAD_MIB,
    EMBEDDING_OVERHEAD_WEIGHTS_PERCENT,
    OVERHEAD_WEIGHTS_PERCENT,
    ROUNDING_HEADROOM_MIB,
    MemoryEstimate,
    estimate_embedding_memory,
    estimate_memory,
    estimate_on_disk,
)
from app.core.memory.facts import (
    MIB,
    ModelFacts,
    Quantization,
    facts_from_config,
    find_facts,
    hub_cache_dir,
    hub_repo_id,
    index_weights,
    is_path_like,
    model_facts,
    model_key,
    model_max_len,
    safetensors_files,
    tensor_bytes_by_dtype,
)
from app.core.memory.fit import MAX_GPU_MEMORY_UTILIZATION, VllmFit, vllm_fit_flags
from app.core.memory.kv_cache import KV_BLOCK_TOKENS, kv_bytes_per_token, kv_cache_bytes_per_token
from app.core.memory.weights import Source, parameter_count, parameter_count_from_name

__all__ = [
    "BASE_OVERHEAD_MIB",
    "EMBEDDING_BASE_OVERHEAD_MIB",
    "EMBEDDING_OVERHEAD_WEIGHTS_PERCENT",
    "KV_BLOCK_TOKENS",
    "MAX_GPU_MEMORY_UTILIZATION",
    "MIB",
    "OVERHEAD_WEIGHTS_PERCENT",
    "ROUNDING_HEADROOM_MIB",
    "MemoryEstimate",
    "ModelFacts",
    "Quantization",
    "Source",
    "VllmFit",
    "estimate_embedding_memory",
    "estimate_memory",
    "estimate_on_disk",
    "facts_from_config",
    "find_facts",
    "hub_cache_dir",
    "hub_repo_id",
    "index_weights",
    "is_path_like",
    "kv_bytes_per_token",
    "kv_cache_bytes_per_token",
    "model_facts",
    "model_key",
    "model_max_len",
    "parameter_count",
    "parameter_count_from_name",
    "safetensors_files",
    "tensor_bytes_by_dtype",
    "vllm_fit_flags",
]
