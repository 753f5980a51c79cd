"""What a host knows about a model on its disk: ``ModelFacts``, and the parsers that
make them from a checkpoint's ``config.json`` and safetensors headers.

Each worker reads those files on its own host (``workers.host.model_facts``) and
publishes the facts; the API's estimate is arithmetic over them. Everything here is
pure: it takes the parsed JSON, never a path to open.

The facts keep only what the estimate needs: weight bytes (by dtype), the shapes that
config arithmetic multiplies (one decoder layer's matrices, the embeddings), what sizes
the KV cache (layers, KV heads, head dim, or MLA's latent width), the longest length,
the quantization and the checkpoint's dtype.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MIB = 1024 * 1024

# Bytes per element of the dtype names configs and vLLM's --dtype use.
DTYPE_BYTES = {
    "float16": 2,
    "half": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float32": 4,
    "float": 4,
    "fp32": 4,
}

# Architectures whose MLP is up/down only (no gate projection).
_UNGATED_MLP = frozenset(
    {"gpt2", "gpt_bigcode", "gpt_neox", "gptj", "opt", "falcon", "phi", "bloom", "starcoder2"}
)
# Architectures with a bias on q, k and v (not o) even though config says nothing.
_QKV_BIAS = frozenset({"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"})

Linear = tuple[int, int, int]  # (in, out, count) of a weight matrix in one layer


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


def quantization_from_config(qc: Mapping[str, Any]) -> Quantization | None:
    """How a pre-quantized checkpoint stores its linears (its ``quantization_config``);
    None for a method whose storage this does not model (mxfp4...)."""
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
    if method in ("compressed_tensors", "compressed-tensors"):
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
    return None


# ---------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class ModelFacts:
    """A model on one host's disk, as its worker measured it.

    ``model`` is the key the host files it under: a Hugging Face repo id for a model in
    its hub cache, else the directory's path (see ``model_key``). Sizes are None when
    the files do not say; ``linears`` is empty when config arithmetic does not model the
    architecture.
    """

    model: str
    path: str
    architecture: str = ""  # config's architectures[0], else its model_type
    model_type: str = ""
    dtype: str | None = None  # the checkpoint's torch_dtype
    weights_bytes: int | None = None  # safetensors vLLM loads: index total, else headers
    weights_bytes_by_dtype: dict[str, int] = field(default_factory=dict)  # from headers
    file_bytes: int = 0  # sizes of the checkpoint files (*.safetensors, else *.bin)
    param_count: int | None = None  # from config arithmetic
    layers: int | None = None
    hidden_size: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    kv_latent_dim: int | None = None  # MLA: kv_lora_rank + qk_rope_head_dim, per layer
    max_len: int | None = None
    quantization: str | None = None  # the checkpoint's quant_method
    quant: Quantization | None = None  # its storage; None when not modelled
    linears: tuple[Linear, ...] = ()  # one decoder layer's weight matrices
    layer_other_params: int = 0  # one layer's norms and biases
    embedding_params: int = 0  # embeddings, plus lm_head unless tied
    sentence_transformers: bool = False  # a sentence-transformers model directory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelFacts:
        """The facts from ``to_dict``'s JSON; unknown keys (a newer worker) are ignored."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in d.items() if k in known}
        quant = data.get("quant")
        data["quant"] = Quantization(**quant) if isinstance(quant, Mapping) else None
        data["linears"] = tuple(tuple(int(x) for x in m) for m in data.get("linears") or ())
        data["weights_bytes_by_dtype"] = dict(data.get("weights_bytes_by_dtype") or {})
        return cls(**data)


def model_facts(
    model: str,
    path: str,
    config: Mapping[str, Any] | None,
    *,
    weights_bytes: int | None = None,
    weights_bytes_by_dtype: Mapping[str, int] | None = None,
    file_bytes: int = 0,
    sentence_transformers: bool = False,
) -> ModelFacts:
    """The facts of a checkpoint from its parsed config.json (None when absent) and the
    weight figures the caller took from its safetensors (``checkpoint_weights``)."""
    c = text_config(config or {})
    arch = (config or {}).get("architectures")
    model_type = str(c.get("model_type", ""))
    dtype = _first(config or {}, "torch_dtype", "dtype")
    qc = (config or {}).get("quantization_config")
    quant_method = None
    quant = None
    if isinstance(qc, Mapping) and qc.get("quant_method"):
        quant_method = str(qc["quant_method"]).lower()
        quant = quantization_from_config(qc)
    facts = ModelFacts(
        model=model,
        path=path,
        architecture=str(arch[0]) if isinstance(arch, list) and arch else model_type,
        model_type=model_type,
        dtype=str(dtype) if dtype else None,
        weights_bytes=weights_bytes,
        weights_bytes_by_dtype=dict(weights_bytes_by_dtype or {}),
        file_bytes=file_bytes,
        max_len=model_max_len(config) if config else None,
        quantization=quant_method,
        quant=quant,
        sentence_transformers=sentence_transformers,
    )
    return _with_architecture(facts, c)


def facts_from_config(config: Mapping[str, Any], model: str = "", path: str = "") -> ModelFacts:
    """The facts of a config.json alone (no weights on disk)."""
    return model_facts(model, path, config)


# ---------------------------------------------------------------------------- config


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
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


def _with_architecture(facts: ModelFacts, c: Mapping[str, Any]) -> ModelFacts:
    """``facts`` with the decoder's sizes from the (text) config ``c``, when it has them."""
    sizes: tuple[Any, ...] = (
        _first(c, "hidden_size", "n_embd", "d_model"),
        _first(c, "num_hidden_layers", "n_layer", "num_layers"),
        _first(c, "num_attention_heads", "n_head", "num_heads"),
        c.get("vocab_size"),
    )
    if not all(isinstance(v, int) and v > 0 for v in sizes):
        return facts
    hidden, layers, heads, vocab = (int(v) for v in sizes)
    kv_heads = _first(c, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv_heads is None:
        kv_heads = 1 if c.get("multi_query") else heads
    head_dim = int(c.get("head_dim") or hidden // heads)
    # Absent tie_word_embeddings: count a separate lm_head (the larger figure; Llama's).
    embedding = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    out = {
        "layers": layers,
        "hidden_size": hidden,
        "kv_heads": int(kv_heads),
        "head_dim": head_dim,
        "embedding_params": embedding,
    }
    if "kv_lora_rank" in c:  # multi-head latent attention: KV known, weights not modelled
        latent = int(c["kv_lora_rank"]) + int(c.get("qk_rope_head_dim") or 0)
        return _replace(facts, **out, kv_latent_dim=latent)
    linears, other = _layer_shapes(c, hidden, heads, int(kv_heads), head_dim)
    params = layers * (sum(i * o * k for i, o, k in linears) + other) + embedding + hidden
    return _replace(
        facts, **out, linears=tuple(linears), layer_other_params=other, param_count=params
    )


def _replace(facts: ModelFacts, **changes: Any) -> ModelFacts:
    return ModelFacts(**{**{f.name: getattr(facts, f.name) for f in fields(facts)}, **changes})


def _layer_shapes(
    c: Mapping[str, Any], h: int, heads: int, kv_heads: int, hd: int
) -> tuple[list[Linear], int]:
    """One decoder layer: its linear matrices as (in, out, count), and its other params.

    Counted: q/k/v/o projections; the MLP (gate/up/down, or up/down for the ungated
    architectures); MoE experts (Mixtral ``num_local_experts``, Qwen ``num_experts`` with
    ``moe_intermediate_size`` and a shared expert) with their router; biases on q/k/v
    (Qwen2, or ``attention_bias``, which also biases o) and on the MLP (``mlp_bias``); two
    norm weight vectors; Qwen3's q/k norms. Not counted: LayerNorm biases and rotary
    buffers (not weights), a few thousand parameters per layer at most.
    """
    model_type = str(c.get("model_type", ""))
    intermediate = int(_first(c, "intermediate_size", "n_inner", "ffn_dim") or 4 * h)
    q_out, kv_out = heads * hd, kv_heads * hd
    linears = [(h, q_out, 1), (h, kv_out, 2), (q_out, h, 1)]
    other = 2 * h  # input and post-attention norms
    if c.get("attention_bias"):
        other += q_out + 2 * kv_out + h
    elif model_type in _QKV_BIAS:
        other += q_out + 2 * kv_out
    if model_type.startswith("qwen3"):
        other += 2 * hd  # q_norm and k_norm

    def mlp(width: int, count: int) -> None:
        nonlocal other
        up = 1 if model_type in _UNGATED_MLP else 2
        linears.extend([(h, width, up * count), (width, h, count)])
        if c.get("mlp_bias"):
            other += count * (up * width + h)

    experts = int(_first(c, "num_local_experts", "num_experts", "n_routed_experts") or 0)
    if experts > 1:
        mlp(int(c.get("moe_intermediate_size") or intermediate), experts)
        other += h * experts  # router
        shared = int(c.get("shared_expert_intermediate_size") or 0)
        if shared:
            mlp(shared, 1)
            other += h  # shared expert gate
    else:
        mlp(intermediate, 1)
    return linears, other


def model_max_len(config: Mapping[str, Any]) -> int | None:
    """The longest sequence the model supports, as vLLM derives it; None when unknown.

    The smallest of ``max_position_embeddings``, ``n_positions``, ``max_seq_len``,
    ``seq_length``, ``max_sequence_length``; times the factor of a linear, dynamic or
    yarn ``rope_scaling`` (yarn from ``original_max_position_embeddings``). Other rope
    types (llama3, longrope, mrope) already state the extended length.
    """
    c = text_config(config)
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

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(names: Iterable[str]) -> list[str]:
    """The safetensors files of a directory vLLM loads: when it holds several
    checkpoints, only ``model*.safetensors`` (not e.g. Mistral's ``consolidated``)."""
    files = sorted(n for n in names if n.endswith(".safetensors"))
    if any(n.startswith("model") for n in files):
        files = [n for n in files if n.startswith("model")]
    return files


def index_weights(index: Mapping[str, Any]) -> tuple[int | None, list[str]]:
    """``model.safetensors.index.json``: its ``metadata.total_size`` (None when absent)
    and the shard files its ``weight_map`` names."""
    total = (index.get("metadata") or {}).get("total_size")
    shards = sorted(set((index.get("weight_map") or {}).values()))
    if isinstance(total, int | float) and total > 0:
        return int(total), shards
    return None, shards


def tensor_bytes_by_dtype(header: Mapping[str, Any]) -> dict[str, int]:
    """Bytes of each dtype's tensors in one safetensors header (JSON mapping tensor
    names to dtype, shape and data_offsets, plus an optional ``__metadata__``).
    Raises KeyError, TypeError or ValueError for a malformed header."""
    out: dict[str, int] = {}
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        start, end = tensor["data_offsets"]
        dtype = str(tensor.get("dtype", "?"))
        out[dtype] = out.get(dtype, 0) + int(end) - int(start)
    return out


# ---------------------------------------------------------------------------- where


def hub_cache_dir(env: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache named by ``env``: ``HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``$HOME/.cache/huggingface/hub``. A leading ``~`` is expanded with ``env``'s HOME
    (left as is without one)."""

    def expand(value: str) -> Path:
        home = env.get("HOME")
        if home and (value == "~" or value.startswith("~/")):
            value = home + value[1:]
        return Path(value)

    if env.get("HF_HUB_CACHE"):
        return expand(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return expand(env["HF_HOME"]) / "hub"
    if env.get("XDG_CACHE_HOME"):
        return expand(env["XDG_CACHE_HOME"]) / "huggingface" / "hub"
    return expand("~/.cache") / "huggingface" / "hub"


def hub_repo_id(cache_entry: str) -> str | None:
    """The repo id of a hub cache directory name (``models--org--name`` -> ``org/name``)."""
    if not cache_entry.startswith("models--"):
        return None
    return cache_entry.removeprefix("models--").replace("--", "/", 1) or None


def is_path_like(model: str) -> bool:
    """Whether ``model`` reads as a local path rather than a Hugging Face repo id
    (``name`` or ``org/name``). By its spelling alone: no disk is consulted."""
    if model.startswith(("/", "~", "./", "../")) or model in (".", ".."):
        return True
    parts = model.split("/")
    return len(parts) > 2 or any(p in ("", ".", "..") for p in parts)


def model_key(model: str) -> str:
    """The key a host files ``model``'s facts under: a repo id as is, a path normalised
    (``..``, ``.`` and doubled or trailing slashes removed; ``~`` kept)."""
    if not is_path_like(model):
        return model
    return posixpath.normpath(model) if model else model


def find_facts(
    models: Mapping[str, ModelFacts], model: str, *, embedding: bool = False
) -> ModelFacts | None:
    """``model``'s facts among one host's. A bare embedding name ("all-MiniLM-L6-v2")
    is also looked up as "sentence-transformers/<name>", as sentence-transformers does."""
    found = models.get(model_key(model))
    if found is None and embedding and "/" not in model and model:
        found = models.get(f"sentence-transformers/{model}")
    return found
