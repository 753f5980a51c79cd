"""KV cache bytes per token on one GPU: from the model's facts, else guessed from its size."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from app.core.memory.facts import ModelFacts, facts_from_config

# vLLM's KV cache is paged in blocks of 16 tokens (its default --block-size): a sequence
# of n tokens occupies ceil(n / 16) blocks, and lengths we hand to vLLM are multiples of 16.
KV_BLOCK_TOKENS = 16

# See heuristic_kv_bytes_per_token.
_NAME_KV_COEFFICIENT = 1.5


def kv_bytes_per_token(
    facts: ModelFacts,
    *,
    kv_dtype_bytes: int = 2,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> int | None:
    """KV cache bytes of one token on one GPU; None when the facts do not say.

    2 (K and V) x ceil(layers / pipeline_parallel) x max(1, ceil(kv_heads / tensor_parallel))
    x head_dim x kv_dtype_bytes: vLLM splits KV heads across tensor-parallel ranks and
    replicates them when there are fewer heads than ranks. Multi-head latent attention
    (DeepSeek) caches one (kv_lora_rank + qk_rope_head_dim) vector per layer, replicated.
    """
    if facts.layers is None:
        return None
    layers = math.ceil(facts.layers / pipeline_parallel)
    if facts.kv_latent_dim is not None:
        return layers * facts.kv_latent_dim * kv_dtype_bytes
    if facts.kv_heads is None or facts.head_dim is None:
        return None
    heads = max(1, math.ceil(facts.kv_heads / tensor_parallel))
    return 2 * layers * heads * facts.head_dim * kv_dtype_bytes


def kv_cache_bytes_per_token(
    config: Mapping[str, Any],
    *,
    kv_dtype_bytes: int = 2,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> int | None:
    """``kv_bytes_per_token`` of a config.json."""
    return kv_bytes_per_token(
        facts_from_config(config),
        kv_dtype_bytes=kv_dtype_bytes,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
    )


def heuristic_kv_bytes_per_token(params: int, kv_dtype_bytes: int) -> int:
    """KV bytes per token (all GPUs) guessed from a parameter count when no config says.

    For modern GQA decoders KV bytes per token grow roughly with the square root of the
    parameter count: 1.5 x sqrt(params) x (kv bytes / 2) gives 134 KB/token at 8e9
    (Llama-3.1-8B: 131,072; Qwen2.5-7B: 57,344) and 397 KB/token at 70e9
    (Llama-3.1-70B: 327,680). Old multi-head models (Llama-2-7B: 524,288) come out low;
    they usually have a config on disk or a short context.
    """
    return round(_NAME_KV_COEFFICIENT * math.sqrt(params) * kv_dtype_bytes / 2)


def kv_tokens(length: int) -> int:
    """Tokens the KV cache holds for a sequence of ``length``: whole 16-token blocks."""
    return math.ceil(length / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
