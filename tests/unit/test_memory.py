"""Memory estimate and vLLM fit flags, checked against figures computed by hand.

The three config.json fixtures under tests/fixtures/models/ are the published configs
of Qwen/Qwen2.5-1.5B-Instruct, meta-llama/Llama-3.1-8B-Instruct and
Qwen/Qwen2.5-7B-Instruct-AWQ; the estimate is arithmetic over the facts parsed from
them (as a host holding only the config would publish them; reading files from disk is
tested in test_model_facts.py). Every expected number below is derived in the comment
above it from those files' fields; MiB = 2**20 bytes, GiB = 1024 MiB; sizes round UP to
whole MiB. Constants of app/core/memory/estimate.py used in the sums:
  overhead = 1536 MiB + ceil(5% of weights MiB per GPU);  headroom = 192 MiB;
  KV is sized for ceil(max_model_len / 16) * 16 tokens (vLLM's 16-token blocks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import ValidationError
from app.core.memory import (
    MemoryEstimate,
    ModelFacts,
    estimate_embedding_memory,
    estimate_memory,
    facts_from_config,
    kv_cache_bytes_per_token,
    model_max_len,
    parameter_count,
    parameter_count_from_name,
    vllm_fit_flags,
)
from tests.model_fixtures import LLAMA_8B, QWEN_1_5B, QWEN_7B_AWQ

H100_MIB = 81559  # NVML total of an H100 80GB HBM3
H200_MIB = 143771  # NVML total of an H200 141GB


def config_of(model_dir: Path) -> dict[str, object]:
    return json.loads((model_dir / "config.json").read_text())


def facts_of(model_dir: Path) -> ModelFacts:
    """The facts of a fixture: its config.json, no weights on disk."""
    return facts_from_config(config_of(model_dir), str(model_dir), str(model_dir))


def estimate(model_dir: Path, **kwargs: Any) -> MemoryEstimate:
    """``estimate_memory`` of a fixture, from its facts."""
    return estimate_memory(str(model_dir), facts=facts_of(model_dir), **kwargs)


# ---------------------------------------------------------------------------- Qwen2.5-1.5B
#
# config.json: hidden_size h=1536, num_hidden_layers L=28, intermediate_size i=8960,
# vocab_size V=151936, num_attention_heads 12, num_key_value_heads 2, no head_dim so
# head_dim = 1536/12 = 128, tie_word_embeddings true, torch_dtype bfloat16 (2 bytes),
# model_type qwen2 (bias on q, k, v), max_position_embeddings 32768.
#
# per layer:  q 1536*1536 = 2,359,296   k, v 1536*256 = 393,216 each   o 2,359,296
#             qkv bias 1536+256+256 = 2,048
#             MLP gate/up/down 3*1536*8960 = 41,287,680
#             2 RMSNorms 2*1536 = 3,072                       -> 46,797,824
# 28 layers = 1,310,339,072; embeddings 151936*1536 = 233,373,696 (lm_head tied);
# final norm 1,536.  Total 1,543,714,304 params: the model card's "1.54B".
# Weights 2 bytes * 1,543,714,304 = 3,087,428,608 B = 2944.4 MiB -> 2945 MiB
# KV per token 2 * 28 layers * 2 kv heads * 128 * 2 B = 28,672 B
# KV for 32768 tokens 28,672 * 32,768 = 939,524,096 B = 896 MiB
# overhead 1536 + ceil(2945 * 0.05 = 147.25) = 1684 MiB
# total 2945 + 896 + 1684 + 192 = 5717 MiB per GPU
QWEN_1_5B_PARAMS = 1_543_714_304
QWEN_1_5B_TOTAL_MIB = 5717


def test_qwen2_5_1_5b_parameter_count_is_the_published_one() -> None:
    assert parameter_count(config_of(QWEN_1_5B)) == QWEN_1_5B_PARAMS
    assert round(QWEN_1_5B_PARAMS / 1e9, 2) == 1.54


def test_qwen2_5_1_5b_estimate_from_config() -> None:
    est = estimate(QWEN_1_5B)
    assert est.source == "config"  # the fixture holds no weights
    assert est.weights_bytes == 3_087_428_608
    assert est.weights_mib_per_gpu == 2945
    assert est.kv_bytes_per_token_per_gpu == 28_672
    assert est.kv_cache_mib_per_gpu == 896
    assert est.overhead_mib == 1684
    assert est.max_model_len == 32768
    assert est.model_max_len == 32768
    assert est.per_gpu_mib == QWEN_1_5B_TOTAL_MIB


def test_explain_breaks_the_total_down() -> None:
    assert estimate(QWEN_1_5B).explain() == (
        "Qwen2.5-1.5B-Instruct: 2.9 GiB weights + 0.9 GiB KV (32768 tokens) + 1.6 GiB "
        "overhead + 0.2 GiB headroom = 5.6 GiB per GPU (size from config)"
    )


# ---------------------------------------------------------------------------- Llama-3.1-8B
#
# config.json: h=4096, num_hidden_layers L=32, i=14336, V=128256, 32 heads,
# num_key_value_heads 8, head_dim 4096/32 = 128, tie_word_embeddings false,
# attention_bias false, mlp_bias false, torch_dtype bfloat16,
# max_position_embeddings 131072 (rope_type llama3: already the extended length).
#
# per layer:  q, o 4096*4096 = 16,777,216 each   k, v 4096*1024 = 4,194,304 each
#             MLP 3*4096*14336 = 176,160,768     norms 2*4096 = 8,192   -> 218,112,000
# 32 layers = 6,979,584,000; embeddings + lm_head 2*128256*4096 = 1,050,673,152;
# final norm 4,096.  Total 8,030,261,248 params: the model card's "8.03B".
# Weights 2 B * 8,030,261,248 = 16,060,522,496 B = 15316.5 MiB -> 15317 MiB
# KV per token 2 * 32 * 8 * 128 * 2 B = 131,072 B (128 KiB)
# max_model_len: no argument -> min(131072, default 32768) = 32768
# KV 131,072 * 32,768 B = 4 GiB = 4096 MiB
# overhead 1536 + ceil(15317 * 0.05 = 765.85) = 2302 MiB
# total 15317 + 4096 + 2302 + 192 = 21907 MiB per GPU
LLAMA_8B_PARAMS = 8_030_261_248
LLAMA_8B_TOTAL_MIB = 21907


def test_llama_3_1_8b_parameter_count_is_the_published_one() -> None:
    assert parameter_count(config_of(LLAMA_8B)) == LLAMA_8B_PARAMS
    assert round(LLAMA_8B_PARAMS / 1e9, 2) == 8.03


def test_llama_3_1_8b_estimate_caps_length_at_the_default() -> None:
    est = estimate(LLAMA_8B)
    assert est.weights_bytes == 16_060_522_496
    assert est.weights_mib_per_gpu == 15317
    assert est.kv_bytes_per_token_per_gpu == 131_072
    assert est.max_model_len == 32768
    assert est.model_max_len == 131072
    assert est.kv_cache_mib_per_gpu == 4096
    assert est.overhead_mib == 2302
    assert est.per_gpu_mib == LLAMA_8B_TOTAL_MIB


def test_llama_3_1_8b_at_its_full_length() -> None:
    # KV 131,072 B * 131,072 tokens = 16 GiB = 16384 MiB; 15317 + 16384 + 2302 + 192
    est = estimate(LLAMA_8B, max_model_len=131072)
    assert est.kv_cache_mib_per_gpu == 16384
    assert est.per_gpu_mib == 34195


def test_tensor_parallel_2_halves_weights_and_kv_heads() -> None:
    # weights 16,060,522,496 / 2 = 8,030,261,248 B = 7658.25 MiB -> 7659
    # KV heads 8 / 2 = 4 per GPU: 2 * 32 * 4 * 128 * 2 B = 65,536 B; * 32768 = 2048 MiB
    # overhead 1536 + ceil(7659 * 0.05 = 382.95) = 1919; total 7659+2048+1919+192 = 11818
    one = estimate(LLAMA_8B)
    two = estimate(LLAMA_8B, tensor_parallel=2)
    assert two.weights_mib_per_gpu == 7659
    assert two.kv_bytes_per_token_per_gpu == one.kv_bytes_per_token_per_gpu // 2 == 65_536
    assert two.kv_cache_mib_per_gpu == 2048
    assert two.per_gpu_mib == 11818


def test_kv_heads_are_replicated_when_tensor_parallel_exceeds_them() -> None:
    # 8 KV heads on 16 ranks: vLLM keeps one whole head per rank -> 2*32*1*128*2 = 16,384
    assert kv_cache_bytes_per_token(config_of(LLAMA_8B), tensor_parallel=16) == 16_384


def test_pipeline_parallel_splits_layers() -> None:
    # 32 layers over 3 stages: ceil(32/3) = 11 per GPU -> 2*11*8*128*2 = 45,056
    assert kv_cache_bytes_per_token(config_of(LLAMA_8B), pipeline_parallel=3) == 45_056


# ---------------------------------------------------------------------------- Qwen2.5-7B AWQ
#
# config.json: h=3584, L=28, i=18944, V=152064, 28 heads, num_key_value_heads 4,
# head_dim 3584/28 = 128, tie_word_embeddings false, model_type qwen2 (qkv bias),
# torch_dtype float16, quantization_config {quant_method awq, bits 4, group_size 128,
# zero_point true, version gemm}, max_position_embeddings 32768.
#
# Unquantized count (for the published figure): linear params per layer
#   q, o 3584*3584 = 12,845,056 each; k, v 3584*512 = 1,835,008 each;
#   MLP 3*3584*18944 = 203,685,888                          -> 233,046,016
#   + qkv bias 3584+512+512 = 4,608 + norms 2*3584 = 7,168  -> 233,057,792 per layer
# 28 layers = 6,525,618,176 + embeddings and lm_head 2*152064*3584 = 1,089,994,752
# + final norm 3,584 = 7,615,616,512 params: Qwen2.5-7B's "7.61B".
#
# AWQ storage of an in x out linear (AutoAWQ GEMM): qweight in*out*4/8 bytes; scales
# fp16 (in/128)*out*2 bytes; qzeros 4-bit (in/128)*out/2 bytes. Every `in` here
# (3584, 18944) divides by 128, so per layer:
#   packed 233,046,016 / 2 = 116,523,008; groups*out = 233,046,016/128 = 1,820,672;
#   scales 3,641,344 + zeros 910,336                     -> 121,074,688 B quantized
#   + 16-bit bias and norms 11,776 * 2 = 23,552 B        -> 121,098,240 B per layer
# 28 layers = 3,390,750,720 B; embeddings + lm_head 16-bit 1,089,994,752 * 2 =
# 2,179,989,504 B; final norm 7,168 B.  Total 5,570,747,392 B (5.57 GB; the hub's two
# safetensors shards hold about 5.58 GB) = 5312.7 MiB -> 5313 MiB
# KV per token 2 * 28 * 4 * 128 * 2 B (float16) = 57,344 B; * 32768 = 1792 MiB
# overhead 1536 + ceil(5313 * 0.05 = 265.65) = 1802 MiB
# total 5313 + 1792 + 1802 + 192 = 9099 MiB per GPU
QWEN_7B_PARAMS = 7_615_616_512
QWEN_7B_AWQ_TOTAL_MIB = 9099


def test_qwen2_5_7b_awq_counts_the_unquantized_parameters() -> None:
    assert parameter_count(config_of(QWEN_7B_AWQ)) == QWEN_7B_PARAMS
    assert round(QWEN_7B_PARAMS / 1e9, 2) == 7.62  # the card rounds down to 7.61B
    assert abs(QWEN_7B_PARAMS - 7.61e9) / 7.61e9 < 0.001


def test_qwen2_5_7b_awq_estimate_uses_4_bit_linears_and_16_bit_embeddings() -> None:
    est = estimate(QWEN_7B_AWQ)
    assert est.source == "config"
    assert est.weights_bytes == 5_570_747_392
    assert est.weights_mib_per_gpu == 5313
    assert est.kv_bytes_per_token_per_gpu == 57_344
    assert est.kv_cache_mib_per_gpu == 1792
    assert est.overhead_mib == 1802
    assert est.per_gpu_mib == QWEN_7B_AWQ_TOTAL_MIB


def test_awq_marlin_argument_does_not_change_a_prequantized_checkpoint() -> None:
    est = estimate(QWEN_7B_AWQ, quantization="awq_marlin")
    assert est.weights_bytes == 5_570_747_392


def test_in_flight_fp8_quantizes_linears_to_one_byte() -> None:
    # Llama-8B linear params 32 * 218,103,808 = 6,979,321,856 at 1 B, plus one fp32
    # scale per output channel: 32 * (4096+1024+1024+4096+14336*2+4096) * 4 = 5,505,024;
    # norms 32*8,192 + 4,096 and embeddings 1,050,673,152 at 2 B = 2,101,878,784.
    est = estimate(LLAMA_8B, quantization="fp8")
    assert est.weights_bytes == 6_979_321_856 + 5_505_024 + 2_101_878_784


# ---------------------------------------------------------------------------- lengths


def test_max_model_len_above_the_model_maximum_is_refused() -> None:
    with pytest.raises(ValidationError) as err:
        estimate(QWEN_1_5B, max_model_len=65536)
    assert err.value.field == "max_model_len"
    assert "32768" in err.value.message


def test_kv_is_sized_in_whole_16_token_blocks() -> None:
    # 1000 tokens occupy 63 blocks = 1008 tokens: 28,672 * 1008 B = 27.6 MiB -> 28
    est = estimate(QWEN_1_5B, max_model_len=1000)
    assert est.max_model_len == 1000
    assert est.kv_cache_mib_per_gpu == 28


def test_default_max_model_len_caps_the_model_maximum() -> None:
    est = estimate(LLAMA_8B, default_max_model_len=8192)
    assert est.max_model_len == 8192
    assert est.kv_cache_mib_per_gpu == 1024  # 131,072 B * 8192 = 1 GiB


def test_yarn_rope_scaling_extends_the_maximum_and_llama3_does_not() -> None:
    yarn = {
        "max_position_embeddings": 32768,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },
    }
    assert model_max_len(yarn) == 131072
    assert model_max_len(config_of(LLAMA_8B)) == 131072


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("model", "params"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", 7_000_000_000),
        ("Qwen/Qwen2.5-1.5B-Instruct", 1_500_000_000),
        ("Qwen/Qwen2-0.5b-instruct", 500_000_000),
        ("meta-llama/Llama-3.1-8B-Instruct", 8_000_000_000),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", 56_000_000_000),
        ("facebook/opt-350m", 350_000_000),
        ("Qwen/Qwen3-30B-A3B", 30_000_000_000),
        ("/models/llama-70b/", 70_000_000_000),
        ("openai-community/gpt2", None),
        ("BAAI/bge-m3", None),
    ],
)
def test_parameter_count_from_name(model: str, params: int | None) -> None:
    assert parameter_count_from_name(model) == params


def test_name_fallback_when_the_model_is_not_on_disk() -> None:
    # 7e9 params * 2 B = 14e9 B = 13351.4 MiB -> 13352; KV heuristic
    # round(1.5 * sqrt(7e9)) = 125,499 B/token * 32768 = 3922.0 MiB -> 3922;
    # overhead 1536 + ceil(667.6) = 2204; total 13352 + 3922 + 2204 + 192 = 19670
    est = estimate_memory("Qwen/Qwen2.5-7B-Instruct")
    assert est.source == "name"
    assert est.weights_bytes == 14_000_000_000
    assert est.kv_bytes_per_token_per_gpu == 125_499
    assert est.model_max_len is None
    assert est.per_gpu_mib == 19670


def test_name_fallback_of_a_quantized_model() -> None:
    # 4-bit: 0.5 B + 0.25 B for 16-bit embeddings and scales -> 7e9 * 0.75 = 5.25e9 B
    est = estimate_memory("TheBloke/Llama-2-7B-AWQ")
    assert est.weights_bytes == 5_250_000_000


def test_unknown_model_without_size_names_required_memory_gb() -> None:
    with pytest.raises(ValidationError) as err:
        estimate_memory("some-lab/mystery-model")
    assert err.value.field == "required_memory_gb"
    assert "required_memory_gb" in err.value.message
    assert "mystery-model" in err.value.message


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValidationError) as err:
        estimate(QWEN_1_5B, dtype="float8")
    assert err.value.field == "dtype"


# ---------------------------------------------------------------------------- explicit


def test_required_memory_gb_overrides_the_estimate_and_keeps_the_breakdown() -> None:
    est = estimate(QWEN_1_5B, required_memory_gb=12.5)
    assert est.source == "explicit"
    assert est.per_gpu_mib == 12800
    assert est.weights_mib_per_gpu == 2945  # still known, for vllm_fit_flags
    assert est.max_model_len == 32768
    assert "12.5 GiB per GPU (required_memory_gb" in est.explain()


def test_required_memory_gb_for_an_unknown_model_does_not_fail() -> None:
    est = estimate_memory("some-lab/mystery-model", required_memory_gb=10)
    assert (est.source, est.per_gpu_mib, est.weights_bytes) == ("explicit", 10240, 0)
    assert est.kv_bytes_per_token_per_gpu == 0
    assert est.max_model_len == 32768
    fit = vllm_fit_flags(est, 10240, H100_MIB)
    assert fit.max_model_len is None  # nothing known to size the KV cache with


def test_required_memory_gb_does_not_excuse_a_too_long_max_model_len() -> None:
    with pytest.raises(ValidationError) as err:
        estimate(QWEN_1_5B, max_model_len=40000, required_memory_gb=40)
    assert err.value.field == "max_model_len"


# ---------------------------------------------------------------------------- vllm flags


def test_utilization_is_rounded_down_so_vllm_never_takes_more_than_reserved() -> None:
    est = estimate(QWEN_1_5B)
    fit = vllm_fit_flags(est, est.per_gpu_mib, H100_MIB)
    # 5717 / 81559 = 0.07009... -> 0.070 (never 0.071: 0.071 * 81559 = 5790.7 > 5717)
    assert fit.gpu_memory_utilization == 0.070
    assert fit.gpu_memory_utilization * H100_MIB <= est.per_gpu_mib
    assert fit.max_model_len is None  # 32768 is Qwen2.5-1.5B's own maximum and it fits


def test_llama_3_1_8b_gets_a_reduced_max_model_len_on_a_small_reservation() -> None:
    # 20 GiB = 20480 MiB on an H100: utilization floor(20480/81559, 3) = 0.251; vLLM takes
    # floor(0.251 * 81559) = 20471 MiB; minus weights 15317 and overhead 2302 leaves
    # 2852 MiB = 2,990,538,752 B of KV / 131,072 B = 22816 tokens (a multiple of 16).
    est = estimate(LLAMA_8B)
    fit = vllm_fit_flags(est, 20480, H100_MIB)
    assert fit.gpu_memory_utilization == 0.251
    assert fit.max_model_len == 22816


def test_llama_3_1_8b_capped_at_the_default_passes_that_length() -> None:
    # The model's own 131072 would not fit the reservation made for 32768 tokens.
    est = estimate(LLAMA_8B)
    assert vllm_fit_flags(est, est.per_gpu_mib, H100_MIB).max_model_len == 32768


def test_llama_3_1_8b_reserved_for_its_full_length_needs_no_flag() -> None:
    est = estimate(LLAMA_8B, max_model_len=131072)
    assert vllm_fit_flags(est, est.per_gpu_mib, H200_MIB).max_model_len is None


@pytest.mark.parametrize("model_dir", [QWEN_1_5B, LLAMA_8B, QWEN_7B_AWQ])
@pytest.mark.parametrize("gpu_total_mib", [24564, H100_MIB, H200_MIB])
def test_reserving_the_estimate_always_fits_its_length(model_dir: Path, gpu_total_mib: int) -> None:
    # The headroom absorbs what rounding the utilization down loses (< 0.001 x total).
    est = estimate(model_dir)
    if est.per_gpu_mib > gpu_total_mib:
        pytest.skip("does not fit this GPU at all")
    fit = vllm_fit_flags(est, est.per_gpu_mib, gpu_total_mib)
    assert fit.max_model_len in (None, est.max_model_len)


def test_reservation_without_room_for_16_tokens_is_refused() -> None:
    est = estimate(LLAMA_8B)
    with pytest.raises(ValidationError) as err:
        vllm_fit_flags(est, 17000, H100_MIB)  # weights + overhead alone are 17619 MiB
    assert err.value.field == "required_memory_gb"


def test_explicit_reservation_too_small_for_the_asked_length_is_refused() -> None:
    est = estimate(LLAMA_8B, max_model_len=131072, required_memory_gb=24)
    with pytest.raises(ValidationError) as err:
        vllm_fit_flags(est, est.per_gpu_mib, H100_MIB)
    assert err.value.field == "max_model_len"


def test_utilization_is_capped() -> None:
    est = estimate(QWEN_1_5B)
    assert vllm_fit_flags(est, H100_MIB, H100_MIB).gpu_memory_utilization == 0.98


# ---------------------------------------------------------------------------- embeddings


def test_embedding_estimate_from_file_sizes() -> None:
    facts = ModelFacts(
        "all-MiniLM-L6-v2",
        "/m/all-MiniLM-L6-v2",
        dtype="float32",
        file_bytes=90_868_376,  # all-MiniLM-L6-v2's model.safetensors size
        max_len=512,
    )
    # 90,868,376 B = 86.7 MiB -> 87; overhead 1024 + ceil(8.7) = 1033; + 192 = 1312
    est = estimate_embedding_memory("all-MiniLM-L6-v2", facts=facts)
    assert est.source == "safetensors"
    assert est.weights_mib_per_gpu == 87
    assert est.kv_cache_mib_per_gpu == 0
    assert est.per_gpu_mib == 87 + 1033 + 192
    assert est.model_max_len == 512
    half = estimate_embedding_memory("all-MiniLM-L6-v2", facts=facts, dtype="float16")
    assert half.weights_bytes == 90_868_376 // 2


def test_embedding_name_fallback_and_unknown() -> None:
    est = estimate_embedding_memory("intfloat/e5-mistral-7b-instruct")
    assert (est.source, est.weights_bytes) == ("name", 28_000_000_000)  # float32
    with pytest.raises(ValidationError) as err:
        estimate_embedding_memory("BAAI/bge-m3")
    assert err.value.field == "required_memory_gb"
    explicit = estimate_embedding_memory("BAAI/bge-m3", required_memory_gb=3)
    assert (explicit.source, explicit.per_gpu_mib) == ("explicit", 3072)


# ---------------------------------------------------------------------------- facts


def test_facts_survive_their_json_round_trip() -> None:
    for model_dir in (QWEN_1_5B, LLAMA_8B, QWEN_7B_AWQ):
        facts = facts_of(model_dir)
        assert ModelFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
    # A newer worker's extra keys are ignored, missing ones take their defaults.
    assert ModelFacts.from_dict({"model": "m", "path": "/p", "new": 1}) == ModelFacts("m", "/p")


def test_facts_keep_what_the_estimate_needs() -> None:
    awq = facts_of(QWEN_7B_AWQ)
    assert (awq.layers, awq.kv_heads, awq.head_dim, awq.hidden_size) == (28, 4, 128, 3584)
    assert (awq.max_len, awq.dtype, awq.quantization) == (32768, "float16", "awq")
    assert awq.quant is not None and (awq.quant.bits, awq.quant.group_size) == (4, 128)
    assert awq.param_count == QWEN_7B_PARAMS
    assert awq.architecture == "Qwen2ForCausalLM"


def test_a_quantization_method_the_estimate_cannot_model_needs_the_weights_on_disk() -> None:
    config = {**config_of(QWEN_1_5B), "quantization_config": {"quant_method": "mxfp4"}}
    facts = facts_from_config(config)
    assert (facts.quantization, facts.quant) == ("mxfp4", None)
    with pytest.raises(ValidationError, match="mxfp4"):
        estimate_memory("q", facts=facts)
    # With the checkpoint's safetensors measured, what is stored is what the GPU holds.
    stored = ModelFacts.from_dict({**facts.to_dict(), "weights_bytes": 1_000_000_000})
    assert estimate_memory("q", facts=stored).weights_bytes == 1_000_000_000


def test_multi_head_latent_attention_sizes_the_kv_cache_but_not_the_weights() -> None:
    # DeepSeek-V2-Lite-like: 27 layers, kv_lora_rank 512 + qk_rope_head_dim 64 per layer
    config = {
        "hidden_size": 2048,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "vocab_size": 102400,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
    }
    facts = facts_from_config(config)
    assert facts.linears == () and facts.param_count is None
    assert kv_cache_bytes_per_token(config) == 27 * 576 * 2
