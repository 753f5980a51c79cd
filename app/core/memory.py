"""How much GPU memory an engine needs, and the vLLM flags that keep it inside that.

Per GPU, an LLM engine needs

    weights / (tensor_parallel x pipeline_parallel)
  + KV cache for one full sequence of ``max_model_len`` tokens
  + runtime overhead (CUDA context, CUDA graphs, peak activations)
  + rounding headroom (so that --gpu-memory-utilization, rounded down, still covers it)

Weights come, in order of preference, from the checkpoint's safetensors metadata (when
the model is a local directory or sits in the local Hugging Face cache), from the
architecture in its config.json, or from a parameter count in its name ("7B"). Nothing
is ever downloaded. An explicit ``required_memory_gb`` overrides the estimate.

Plain data in, plain data out: no Flask, Celery or Redis here. Units are MiB (ints);
1 GiB = 1024 MiB.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.core.errors import ValidationError

MIB = 1024 * 1024

# vLLM's KV cache is paged in blocks of 16 tokens (its default --block-size): a sequence
# of n tokens occupies ceil(n / 16) blocks, and lengths we hand to vLLM are multiples of 16.
KV_BLOCK_TOKENS = 16

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

# vLLM's hard ceiling on --gpu-memory-utilization that we are willing to ask for.
MAX_GPU_MEMORY_UTILIZATION = 0.98

Source = Literal["explicit", "safetensors", "config", "name"]

_DTYPE_BYTES = {
    "float16": 2,
    "half": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float32": 4,
    "float": 4,
    "fp32": 4,
}


# ---------------------------------------------------------------------------- result


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

    def explain(self) -> str:
        """One line a person can read: where each GiB of the reservation goes."""
        name = _short_name(self.model)
        kv = f" + {_gib(self.kv_cache_mib_per_gpu)} KV ({self.max_model_len} tokens)"
        if self.max_model_len == 0:
            kv = ""
        parts = (
            f"{_gib(self.weights_mib_per_gpu)} weights{kv}"
            f" + {_gib(self.overhead_mib)} overhead"
            f" + {_gib(self.headroom_mib)} headroom"
        )
        if self.source == "explicit":
            estimated = self.weights_mib_per_gpu + self.kv_cache_mib_per_gpu + self.overhead_mib
            if estimated == 0:
                return f"{name}: {_gib(self.per_gpu_mib)} per GPU (required_memory_gb)"
            return (
                f"{name}: {_gib(self.per_gpu_mib)} per GPU (required_memory_gb; "
                f"estimate was {parts} = {_gib(estimated + self.headroom_mib)})"
            )
        return f"{name}: {parts} = {_gib(self.per_gpu_mib)} per GPU (size from {self.source})"


@dataclass(frozen=True)
class VllmFit:
    """vLLM flags that keep an engine inside its reservation."""

    gpu_memory_utilization: float
    max_model_len: int | None  # None: vLLM's default (the model's own maximum) fits

    def args(self) -> list[str]:
        """The flags as vLLM argv."""
        out = ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:.3f}"]
        if self.max_model_len is not None:
            out += ["--max-model-len", str(self.max_model_len)]
        return out


# ---------------------------------------------------------------------------- finding


def resolve_model_dir(model: str, hf_home: str | None = None) -> Path | None:
    """The local directory holding ``model``'s files, or None. Never downloads.

    ``model`` is a directory path, or a Hugging Face repo id looked up in the local hub
    cache: ``hf_home``/hub when given, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``. In the
    cache, the snapshot named by ``refs/main`` wins; else the newest snapshot holding a
    config.json.
    """
    if not model.strip():
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        return None  # a path that does not exist; not a repo id
    repo_dir = _hub_cache(hf_home) / ("models--" + model.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        pinned = snapshots / ref.read_text().strip()
        if pinned.is_dir() and any(pinned.iterdir()):
            return pinned
    candidates = [d for d in snapshots.iterdir() if (d / "config.json").is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda d: (d.stat().st_mtime, d.name))


def _hub_cache(hf_home: str | None) -> Path:
    if hf_home:
        return Path(hf_home).expanduser() / "hub"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def load_config(model_dir: Path | None) -> dict[str, Any] | None:
    """config.json of a model directory, or None when absent or unreadable."""
    if model_dir is None:
        return None
    try:
        data = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's part of a config: multimodal configs nest it."""
    if "hidden_size" in config or "n_embd" in config or "d_model" in config:
        return dict(config)
    for key in ("text_config", "llm_config", "language_config"):
        sub = config.get(key)
        if isinstance(sub, dict):
            return {**config, **sub}  # top-level torch_dtype etc. as defaults
    return dict(config)


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


# ---------------------------------------------------------------------------- dtypes


def _checkpoint_dtype_bytes(config: Mapping[str, Any] | None) -> int | None:
    if not config:
        return None
    name = _first(config, "torch_dtype", "dtype")
    return _DTYPE_BYTES.get(str(name).lower()) if name else None


def _dtype_bytes(dtype: str, config: Mapping[str, Any] | None) -> int:
    """Bytes per weight (and KV element) that vLLM will use for ``dtype``."""
    key = dtype.lower()
    if key == "auto":
        stored = _checkpoint_dtype_bytes(config)
        # vLLM's "auto" runs float32 checkpoints in 16 bits; unknown dtype: 16 bits too.
        return 2 if stored is None or stored > 2 else stored
    if key not in _DTYPE_BYTES:
        raise ValidationError(
            f"dtype: {dtype!r} is not one of auto, {', '.join(sorted(_DTYPE_BYTES))}",
            field="dtype",
        )
    return _DTYPE_BYTES[key]


# ---------------------------------------------------------------------------- quantization


@dataclass(frozen=True)
class Quantization:
    """How a quantized linear layer is stored.

    Bytes of an ``in x out`` weight matrix =
        ceil(in * out * bits / 8)                      packed weights
      + groups * out * scale_bytes                     one scale per group and output
      + ceil(groups * out * zero_bits / 8)             one packed zero point likewise
    with groups = ceil(in / group_size), or 1 (per output channel) when group_size is
    None. Embeddings, lm_head, norms, biases and MoE routers stay 16-bit.
    """

    method: str
    bits: int
    group_size: int | None
    scale_bytes: int = 2
    zero_bits: int = 0

    def matrix_bytes(self, n_in: int, n_out: int) -> int:
        groups = math.ceil(n_in / self.group_size) if self.group_size else 1
        packed = math.ceil(n_in * n_out * self.bits / 8)
        return (
            packed
            + groups * n_out * self.scale_bytes
            + math.ceil(groups * n_out * self.zero_bits / 8)
        )


def _quantization(config: Mapping[str, Any] | None, requested: str | None) -> Quantization | None:
    """The checkpoint's quantization (its config wins), else the requested one, else None.

    Raises ``ValidationError`` for a method whose storage we cannot compute.
    """
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method"):
        return _quantization_from_config(qc)
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
    raise _unknown_size(f"quantization {requested!r} is not one the memory estimate knows")


def _quantization_from_config(qc: Mapping[str, Any]) -> Quantization:
    method = str(qc["quant_method"]).lower()
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
        bits = int(_first(qc, "bits", "w_bit") or 4)
        group = int(_first(qc, "group_size", "q_group_size") or 128)
        # AWQ stores zeros only with zero_point; GPTQ checkpoints always carry qzeros.
        zero = bool(qc.get("zero_point", True)) or method.startswith("gptq")
        return Quantization(
            method, bits=bits, group_size=group if group > 0 else None, zero_bits=bits * zero
        )
    if method == "fp8":
        block = qc.get("weight_block_size")
        block_group = int(block[0]) if isinstance(block, list) and block else None
        return Quantization(method, bits=8, group_size=block_group, scale_bytes=4)
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return Quantization(method, bits=8, group_size=None, scale_bytes=4)
        return Quantization(method, bits=4, group_size=64, scale_bytes=4)
    if method == "compressed_tensors" or method == "compressed-tensors":
        for group_cfg in (qc.get("config_groups") or {}).values():
            weights = group_cfg.get("weights") or {}
            if weights.get("num_bits"):
                gs = weights.get("group_size")
                return Quantization(
                    method,
                    bits=int(weights["num_bits"]),
                    group_size=int(gs) if gs else None,
                    zero_bits=0 if weights.get("symmetric", True) else int(weights["num_bits"]),
                )
    raise _unknown_size(f"quantization method {method!r} is not one the memory estimate knows")


# ---------------------------------------------------------------------------- architecture


# Architectures whose MLP is up/down only (no gate projection).
_UNGATED_MLP = frozenset(
    {"gpt2", "gpt_bigcode", "gpt_neox", "gptj", "opt", "falcon", "phi", "bloom", "starcoder2"}
)
# Architectures with a bias on q, k and v (not o) even though config says nothing.
_QKV_BIAS = frozenset({"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"})


@dataclass(frozen=True)
class _Arch:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    model_type: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> _Arch | None:
        c = _text_config(config)
        sizes: tuple[Any, ...] = (
            _first(c, "hidden_size", "n_embd", "d_model"),
            _first(c, "num_hidden_layers", "n_layer", "num_layers"),
            _first(c, "num_attention_heads", "n_head", "num_heads"),
            c.get("vocab_size"),
        )
        if not all(isinstance(v, int) and v > 0 for v in sizes):
            return None
        hidden, layers, heads, vocab = (int(v) for v in sizes)
        kv_heads = _first(c, "num_key_value_heads", "num_kv_heads", "n_head_kv")
        if kv_heads is None:
            kv_heads = 1 if c.get("multi_query") else heads
        return cls(
            hidden=hidden,
            layers=layers,
            intermediate=int(_first(c, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden),
            vocab=vocab,
            heads=heads,
            kv_heads=int(kv_heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            # Absent: count a separate lm_head (the larger figure; Llama's default).
            tied=bool(c.get("tie_word_embeddings", False)),
            model_type=str(c.get("model_type", "")),
        )


def _layer_shapes(config: Mapping[str, Any], arch: _Arch) -> tuple[list[tuple[int, int, int]], int]:
    """One decoder layer: its linear matrices as (in, out, count), and its other params.

    Counted: q/k/v/o projections; the MLP (gate/up/down, or up/down for the ungated
    architectures); MoE experts (Mixtral ``num_local_experts``, Qwen ``num_experts`` with
    ``moe_intermediate_size`` and a shared expert) with their router; biases on q/k/v
    (Qwen2, or ``attention_bias``, which also biases o) and on the MLP (``mlp_bias``); two
    norm weight vectors; Qwen3's q/k norms. Not counted: LayerNorm biases and rotary
    buffers (not weights), a few thousand parameters per layer at most.
    """
    c = _text_config(config)
    h, hd = arch.hidden, arch.head_dim
    q_out, kv_out = arch.heads * hd, arch.kv_heads * hd
    linears = [(h, q_out, 1), (h, kv_out, 2), (q_out, h, 1)]
    other = 2 * h  # input and post-attention norms
    if c.get("attention_bias"):
        other += q_out + 2 * kv_out + h
    elif arch.model_type in _QKV_BIAS:
        other += q_out + 2 * kv_out
    if arch.model_type.startswith("qwen3"):
        other += 2 * hd  # q_norm and k_norm

    def mlp(width: int, count: int) -> None:
        nonlocal other
        up = 1 if arch.model_type in _UNGATED_MLP else 2
        linears.extend([(h, width, up * count), (width, h, count)])
        if c.get("mlp_bias"):
            other += count * (up * width + h)

    experts = int(_first(c, "num_local_experts", "num_experts", "n_routed_experts") or 0)
    if experts > 1:
        mlp(int(c.get("moe_intermediate_size") or arch.intermediate), experts)
        other += h * experts  # router
        shared = int(c.get("shared_expert_intermediate_size") or 0)
        if shared:
            mlp(shared, 1)
            other += h  # shared expert gate
    else:
        mlp(arch.intermediate, 1)
    return linears, other


def parameter_count(config: Mapping[str, Any]) -> int | None:
    """Parameters of a decoder-only transformer from its config.json, or None.

    None for configs lacking the sizes we need and for architectures this does not
    model (multi-head latent attention). See ``_layer_shapes`` for what is counted;
    embeddings count once, plus lm_head unless ``tie_word_embeddings``; plus the final norm.
    """
    return _config_weights(config, quant=None, dtype_bytes=1)  # 1 byte each: a count


def _config_weights(
    config: Mapping[str, Any], quant: Quantization | None, dtype_bytes: int
) -> int | None:
    """Weight bytes computed from config.json; None when the architecture is not modelled."""
    arch = _Arch.from_config(config)
    if arch is None or "kv_lora_rank" in _text_config(config):
        return None
    linears, other = _layer_shapes(config, arch)
    if quant is None:
        linear = sum(n_in * n_out * k for n_in, n_out, k in linears) * dtype_bytes
        dense_bytes = dtype_bytes
    else:
        linear = sum(quant.matrix_bytes(n_in, n_out) * k for n_in, n_out, k in linears)
        dense_bytes = 2  # embeddings, norms, biases stay 16-bit
    embeddings = arch.vocab * arch.hidden * (1 if arch.tied else 2)
    return arch.layers * (linear + other * dense_bytes) + (embeddings + arch.hidden) * dense_bytes


def kv_cache_bytes_per_token(
    config: Mapping[str, Any],
    *,
    kv_dtype_bytes: int = 2,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> int | None:
    """KV cache bytes of one token on one GPU, from config.json; None when unknown.

    2 (K and V) x ceil(layers / pipeline_parallel) x max(1, ceil(kv_heads / tensor_parallel))
    x head_dim x kv_dtype_bytes: vLLM splits KV heads across tensor-parallel ranks and
    replicates them when there are fewer heads than ranks. Multi-head latent attention
    (DeepSeek) caches one (kv_lora_rank + qk_rope_head_dim) vector per layer, replicated.
    """
    c = _text_config(config)
    arch = _Arch.from_config(c)
    if arch is None:
        return None
    layers = math.ceil(arch.layers / pipeline_parallel)
    if "kv_lora_rank" in c:
        latent = int(c["kv_lora_rank"]) + int(c.get("qk_rope_head_dim") or 0)
        return layers * latent * kv_dtype_bytes
    heads = max(1, math.ceil(arch.kv_heads / tensor_parallel))
    return 2 * layers * heads * arch.head_dim * kv_dtype_bytes


def model_max_len(config: Mapping[str, Any]) -> int | None:
    """The longest sequence the model supports, as vLLM derives it; None when unknown.

    The smallest of ``max_position_embeddings``, ``n_positions``, ``max_seq_len``,
    ``seq_length``, ``max_sequence_length``; times the factor of a linear, dynamic or
    yarn ``rope_scaling`` (yarn from ``original_max_position_embeddings``). Other rope
    types (llama3, longrope, mrope) already state the extended length.
    """
    c = _text_config(config)
    keys = (
        "max_position_embeddings",
        "n_positions",
        "max_seq_len",
        "seq_length",
        "max_sequence_length",
    )
    found = [int(c[k]) for k in keys if isinstance(c.get(k), int) and c[k] > 0]
    if not found:
        return None
    length = min(found)
    rope = c.get("rope_scaling")
    if isinstance(rope, dict):
        kind = rope.get("rope_type") or rope.get("type")
        factor = rope.get("factor")
        if kind in ("linear", "dynamic", "yarn") and isinstance(factor, int | float):
            if kind == "yarn" and rope.get("original_max_position_embeddings"):
                length = int(rope["original_max_position_embeddings"])
            length = int(length * factor)
    return length


# ---------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, reading only the header.

    Format: 8-byte little-endian header length, then that many bytes of JSON mapping
    tensor names to dtype, shape and data_offsets (plus an optional ``__metadata__``).
    """
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * MIB:  # a corrupt length must not make us read gigabytes
            raise ValueError(f"{path}: safetensors header of {length} bytes")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    return header


def safetensors_weight_bytes(model_dir: Path) -> int | None:
    """Bytes of all tensors of a checkpoint, from safetensors metadata; None when absent.

    ``model.safetensors.index.json``'s ``metadata.total_size`` when present, else the sum
    of the tensors' ``data_offsets`` in each file's header. When a directory holds
    several checkpoints, only ``model*.safetensors`` count (vLLM loads those, not e.g.
    Mistral's ``consolidated.safetensors``).
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if any(f.name.startswith("model") for f in files):
        files = [f for f in files if f.name.startswith("model")]
    try:
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            total = (index.get("metadata") or {}).get("total_size")
            if isinstance(total, int | float) and total > 0:
                return int(total)
            shards = sorted(set((index.get("weight_map") or {}).values()))
            files = [model_dir / name for name in shards]
        if not files:
            return None
        total_bytes = 0
        for path in files:
            for name, tensor in read_safetensors_header(path).items():
                if name != "__metadata__":
                    start, end = tensor["data_offsets"]
                    total_bytes += int(end) - int(start)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or incomplete download: fall back to config.json
    return total_bytes or None


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


def _quantization_from_name(model: str) -> Quantization | None:
    name = model.lower()
    if re.search(r"awq|gptq|int4|4bit|w4a16|nf4", name):
        return Quantization("name", bits=4, group_size=128)
    if re.search(r"fp8|int8|8bit|w8a8", name):
        return Quantization("name", bits=8, group_size=None)
    return None


# See _heuristic_kv_bytes_per_token.
_NAME_KV_COEFFICIENT = 1.5


# ---------------------------------------------------------------------------- estimates


def estimate_memory(
    model: str,
    *,
    dtype: str = "auto",
    quantization: str | None = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    max_model_len: int | None = None,
    required_memory_gb: float | None = None,
    default_max_model_len: int = 32768,
    hf_home: str | None = None,
) -> MemoryEstimate:
    """Memory per GPU of a vLLM engine serving ``model`` (repo id or local path).

    Weights from safetensors metadata, else config.json, else the name's parameter
    count; plus KV cache for one sequence of ``max_model_len`` tokens (default: the
    model's maximum capped at ``default_max_model_len``); plus overhead and rounding
    headroom. Weights per GPU are the total divided by tensor_parallel x
    pipeline_parallel: vLLM shards every layer, the vocabulary included, across ranks;
    the replicated norms are negligible.

    ``required_memory_gb`` overrides the figure (source "explicit"); the breakdown is
    still filled when the model is known, so that ``vllm_fit_flags`` can size the KV cache.

    Raises ``ValidationError``: ``max_model_len`` above the model's maximum; or the size
    is unknown (not on disk, no size in the name) and ``required_memory_gb`` is not given.
    """
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise ValidationError(
            "tensor_parallel and pipeline_parallel must be >= 1", field="tensor_parallel"
        )
    model_dir = resolve_model_dir(model, hf_home)
    config = load_config(model_dir)
    own_max = model_max_len(config) if config else None
    if max_model_len is not None and own_max is not None and max_model_len > own_max:
        raise ValidationError(
            f"max_model_len: {max_model_len} is above {_short_name(model)}'s maximum of "
            f"{own_max} tokens",
            field="max_model_len",
        )
    length = max_model_len or min(own_max or default_max_model_len, default_max_model_len)
    explicit_mib = None if required_memory_gb is None else round(required_memory_gb * 1024)

    try:
        weights_bytes, source = _weights(
            model, model_dir, config, dtype=dtype, quantization=quantization
        )
    except ValidationError as err:
        if explicit_mib is None or err.field != "required_memory_gb":
            raise
        weights_bytes, source = 0, "explicit"

    gpus = tensor_parallel * pipeline_parallel
    kv_dtype_bytes = _dtype_bytes(dtype, config)
    kv_per_token = None
    if config is not None:
        kv_per_token = kv_cache_bytes_per_token(
            config,
            kv_dtype_bytes=kv_dtype_bytes,
            tensor_parallel=tensor_parallel,
            pipeline_parallel=pipeline_parallel,
        )
    if kv_per_token is None and weights_bytes:
        params = parameter_count_from_name(model) or weights_bytes // kv_dtype_bytes
        kv_per_token = math.ceil(_heuristic_kv_bytes_per_token(params, kv_dtype_bytes) / gpus)
    kv_per_token = kv_per_token or 0
    weights_mib = math.ceil(weights_bytes / gpus / MIB)
    kv_tokens = math.ceil(length / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    kv_mib = math.ceil(kv_per_token * kv_tokens / MIB)
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


def _weights(
    model: str,
    model_dir: Path | None,
    config: Mapping[str, Any] | None,
    *,
    dtype: str,
    quantization: str | None,
) -> tuple[int, Source]:
    """Total weight bytes (all GPUs) and where the figure came from."""
    target = _dtype_bytes(dtype, config)
    qc = (config or {}).get("quantization_config")
    prequantized = isinstance(qc, dict) and bool(qc.get("quant_method"))

    # 1. safetensors: what the checkpoint stores is what the GPU holds, unless vLLM
    # quantizes at load time (a quantization asked for on a 16-bit checkpoint) or casts
    # to another width. Any pre-quantized format counts, even one _quantization can't
    # model (mxfp4...).
    if model_dir is not None and (prequantized or quantization is None):
        stored = safetensors_weight_bytes(model_dir)
        if stored:
            checkpoint = _checkpoint_dtype_bytes(config)
            if not prequantized and checkpoint and checkpoint != target:
                stored = stored * target // checkpoint
            return stored, "safetensors"

    quant = _quantization(config, quantization)

    # 2. config.json architecture.
    if config is not None:
        computed = _config_weights(config, quant, target)
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

    raise _unknown_size(
        f"the size of model {model!r} is unknown: it is not a local directory or in the "
        "local Hugging Face cache, and its name states no parameter count"
    )


def _heuristic_kv_bytes_per_token(params: int, kv_dtype_bytes: int) -> int:
    """KV bytes per token (all GPUs) guessed from a parameter count when no config says.

    For modern GQA decoders KV bytes per token grow roughly with the square root of the
    parameter count: 1.5 x sqrt(params) x (kv bytes / 2) gives 134 KB/token at 8e9
    (Llama-3.1-8B: 131,072; Qwen2.5-7B: 57,344) and 397 KB/token at 70e9
    (Llama-3.1-70B: 327,680). Old multi-head models (Llama-2-7B: 524,288) come out low;
    they usually have a config on disk or a short context.
    """
    return round(_NAME_KV_COEFFICIENT * math.sqrt(params) * kv_dtype_bytes / 2)


def _unknown_size(reason: str) -> ValidationError:
    return ValidationError(
        f"required_memory_gb: {reason}; pass required_memory_gb (GiB per GPU)",
        field="required_memory_gb",
    )


def estimate_embedding_memory(
    model: str,
    *,
    dtype: str = "auto",
    required_memory_gb: float | None = None,
    hf_home: str | None = None,
) -> MemoryEstimate:
    """Memory of a sentence-transformers embedding server on one GPU.

    Weights: the checkpoint's file sizes (top-level ``*.safetensors``, else
    ``pytorch_model*.bin``) as stored when ``dtype`` is "auto", else scaled to ``dtype``;
    without files, the name's parameter count at 4 bytes (sentence-transformers loads
    float32 by default) or at ``dtype``. Plus 1 GiB + 10% of weights of overhead and the
    rounding headroom; no KV cache. A bare name ("all-MiniLM-L6-v2") is also looked up
    as "sentence-transformers/<name>", as sentence-transformers itself does.
    """
    explicit_mib = None if required_memory_gb is None else round(required_memory_gb * 1024)
    model_dir = resolve_model_dir(model, hf_home)
    if model_dir is None and "/" not in model:
        model_dir = resolve_model_dir(f"sentence-transformers/{model}", hf_home)
    config = load_config(model_dir)

    weights_bytes = 0
    source: Source = "explicit"
    files: list[Path] = []
    if model_dir is not None:
        files = sorted(model_dir.glob("*.safetensors")) or sorted(
            model_dir.glob("pytorch_model*.bin")
        )
    if files:
        weights_bytes = sum(f.stat().st_size for f in files)
        stored = _checkpoint_dtype_bytes(config)
        if dtype.lower() != "auto" and stored:
            weights_bytes = weights_bytes * _dtype_bytes(dtype, config) // stored
        source = "safetensors"
    elif params := parameter_count_from_name(model):
        per_param = 4 if dtype.lower() == "auto" else _dtype_bytes(dtype, config)
        weights_bytes, source = params * per_param, "name"
    elif explicit_mib is None:
        raise _unknown_size(
            f"the size of embedding model {model!r} is unknown: it is not on disk or in "
            "the local Hugging Face cache, and its name states no parameter count"
        )

    weights_mib = math.ceil(weights_bytes / MIB)
    overhead = 0
    if weights_bytes:
        overhead = EMBEDDING_BASE_OVERHEAD_MIB + math.ceil(
            weights_mib * EMBEDDING_OVERHEAD_WEIGHTS_PERCENT / 100
        )
    own_max = model_max_len(config) if config else None
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
        model_max_len=own_max,
        source="explicit" if explicit_mib is not None else source,
        weights_bytes=weights_bytes,
    )


# ---------------------------------------------------------------------------- vLLM flags


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
            f"required_memory_gb: {_gib(reserved_mib_per_gpu)} is under 0.1% of a "
            f"{_gib(gpu_total_mib)} GPU",
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
            f"required_memory_gb: {_gib(reserved_mib_per_gpu)} per GPU leaves no room for "
            f"a KV cache after {_gib(estimate.weights_mib_per_gpu)} weights and "
            f"{_gib(estimate.overhead_mib)} overhead of {_short_name(estimate.model)}",
            field="required_memory_gb",
        )
    length = min(fits, estimate.max_model_len)
    if estimate.max_model_len_requested and length < estimate.max_model_len:
        raise ValidationError(
            f"max_model_len: {estimate.max_model_len} tokens do not fit in "
            f"{_gib(reserved_mib_per_gpu)} per GPU; at most {length} do",
            field="max_model_len",
        )
    if estimate.model_max_len is not None and length >= estimate.model_max_len:
        return VllmFit(gpu_memory_utilization=utilization, max_model_len=None)
    return VllmFit(gpu_memory_utilization=utilization, max_model_len=length)


# ---------------------------------------------------------------------------- formatting


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f} GiB"


def _short_name(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1] or model
