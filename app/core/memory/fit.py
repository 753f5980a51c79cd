"""The vLLM flags that keep an engine inside its reservation."""

from __future__ import annotations

from dataclasses import dataclass

from app.core.errors import ValidationError
from app.core.memory.estimate import MemoryEstimate, gib, short_name
from app.core.memory.facts import MIB
from app.core.memory.kv_cache import KV_BLOCK_TOKENS

# vLLM's hard ceiling on --gpu-memory-utilization that we are willing to ask for.
MAX_GPU_MEMORY_UTILIZATION = 0.98


@dataclass(frozen=True)
class VllmFit:
    """vLLM flags that keep an engine inside its reservation (the runtime writes the
    argv: ``workers.runtimes.vllm``)."""

    gpu_memory_utilization: float
    max_model_len: int | None  # None: vLLM's default (the model's own maximum) fits


def vllm_fit_flags(
    estimate: MemoryEstimate, reserved_mib_per_gpu: int, gpu_total_mib: int
) -> VllmFit:
    """--gpu-memory-utilization and --max-model-len for an engine given its reservation.

    Utilization = reserved / GPU total, rounded DOWN to 3 decimals: vLLM refuses to
    start when free memory is below utilization x total, and takes that much, so it
    must never exceed the reservation. Capped at 0.98.

    max-model-len: the longest length (a multiple of 16) whose KV cache fits in what
    vLLM gets after weights and overhead, capped by the length the estimate was made
    for. Returned when below the model's own maximum (vLLM's default would not fit, or
    was capped) and None otherwise. None too when the weights or KV size are unknown
    (explicit size of an unknown model): then vLLM's own check has the last word.

    Raises ``ValidationError`` when not even 16 tokens fit, or when a max_model_len the
    caller asked for does not fit in an explicit ``required_memory_gb``.
    """
    if reserved_mib_per_gpu <= 0 or gpu_total_mib <= 0:
        raise ValidationError(
            f"required_memory_gb: reservation of {reserved_mib_per_gpu} MiB on a "
            f"{gpu_total_mib} MiB GPU",
            field="required_memory_gb",
        )
    permille = min(
        reserved_mib_per_gpu * 1000 // gpu_total_mib, round(MAX_GPU_MEMORY_UTILIZATION * 1000)
    )
    if permille < 1:
        raise ValidationError(
            f"required_memory_gb: {gib(reserved_mib_per_gpu)} is under 0.1% of a "
            f"{gib(gpu_total_mib)} GPU",
            field="required_memory_gb",
        )
    utilization = permille / 1000
    if estimate.kv_bytes_per_token_per_gpu <= 0 or estimate.weights_bytes <= 0:
        return VllmFit(gpu_memory_utilization=utilization, max_model_len=None)

    budget_mib = permille * gpu_total_mib // 1000  # what vLLM will actually take
    kv_room = (budget_mib - estimate.weights_mib_per_gpu - estimate.overhead_mib) * MIB
    tokens = max(0, kv_room) // estimate.kv_bytes_per_token_per_gpu
    fits = tokens // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS
    if fits < KV_BLOCK_TOKENS:
        raise ValidationError(
            f"required_memory_gb: {gib(reserved_mib_per_gpu)} per GPU leaves no room for "
            f"a KV cache after {gib(estimate.weights_mib_per_gpu)} weights and "
            f"{gib(estimate.overhead_mib)} overhead of {short_name(estimate.model)}",
            field="required_memory_gb",
        )
    length = min(fits, estimate.max_model_len)
    if estimate.max_model_len_requested and length < estimate.max_model_len:
        raise ValidationError(
            f"max_model_len: {estimate.max_model_len} tokens do not fit in "
            f"{gib(reserved_mib_per_gpu)} per GPU; at most {length} do",
            field="max_model_len",
        )
    if estimate.model_max_len is not None and length >= estimate.model_max_len:
        return VllmFit(gpu_memory_utilization=utilization, max_model_len=None)
    return VllmFit(gpu_memory_utilization=utilization, max_model_len=length)
