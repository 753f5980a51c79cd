"""Model facts read on a host (``workers.host.model_facts``), published to Redis
(``app.state.model_facts``) by the heartbeat, and estimated from (``app.core.memory``).

Fixtures as in test_memory.py: the published config.json of three models; expected
figures are the ones derived there by hand.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from app.core.memory import (
    MIB,
    ModelFacts,
    estimate_embedding_memory,
    estimate_memory,
    find_facts,
    hub_cache_dir,
    is_path_like,
    model_key,
)
from app.state import keys
from app.state.model_facts import (
    host_model_facts,
    hosts_model_facts,
    model_facts_published,
    publish_model_facts,
)
from tests.model_fixtures import LLAMA_8B, QWEN_1_5B, QWEN_7B_AWQ
from workers.agent.heartbeat import ModelFactsPublisher
from workers.host.model_facts import (
    ModelScanner,
    checkpoint_weights,
    measure,
    read_safetensors_header,
    resolve_model_dir,
)

QWEN_1_5B_TOTAL_MIB = 5717
QWEN_7B_AWQ_TOTAL_MIB = 9099


def measured(model_dir: Path) -> ModelFacts:
    facts = measure(str(model_dir), model_dir)
    assert facts is not None
    return facts


def _model_dir_with_config(tmp_path: Path, source: Path) -> Path:
    model_dir = tmp_path / source.name
    model_dir.mkdir()
    shutil.copy(source / "config.json", model_dir / "config.json")
    return model_dir


def _write_header_only(path: Path, tensors: dict[str, dict[str, object]]) -> None:
    header = json.dumps(tensors).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)  # no tensor data at all


# ---------------------------------------------------------------------------- safetensors


def test_safetensors_file_written_by_the_library_gives_the_weight_bytes(
    tmp_path: Path,
) -> None:
    np = pytest.importorskip("numpy")
    st_numpy = pytest.importorskip("safetensors.numpy")
    model_dir = _model_dir_with_config(tmp_path, QWEN_1_5B)
    st_numpy.save_file(
        {
            "embed": np.zeros((1024, 512), dtype=np.float16),  # 1,048,576 B
            "norm": np.zeros((256,), dtype=np.float32),  # 1,024 B
        },
        str(model_dir / "model.safetensors"),
    )
    facts = measured(model_dir)
    assert facts.weights_bytes_by_dtype == {"F16": 1_048_576, "F32": 1_024}
    est = estimate_memory(str(model_dir), facts=facts)
    assert est.source == "safetensors"
    assert est.weights_bytes == 1_048_576 + 1_024
    # architecture (KV, length) still comes from config.json
    assert est.kv_bytes_per_token_per_gpu == 28_672


def test_safetensors_headers_are_read_without_the_tensor_data(tmp_path: Path) -> None:
    # Two shards whose headers promise 6 GB of data the files do not have: only the
    # header may be read, or this would fail.
    model_dir = _model_dir_with_config(tmp_path, LLAMA_8B)
    _write_header_only(
        model_dir / "model-00001-of-00002.safetensors",
        {
            "__metadata__": {"format": "pt"},
            "a": {"dtype": "BF16", "shape": [50_000, 40_000], "data_offsets": [0, 4_000_000_000]},
        },
    )
    _write_header_only(
        model_dir / "model-00002-of-00002.safetensors",
        {"b": {"dtype": "BF16", "shape": [1_000_000_000], "data_offsets": [0, 2_000_000_000]}},
    )
    assert read_safetensors_header(model_dir / "model-00002-of-00002.safetensors")["b"][
        "shape"
    ] == [1_000_000_000]
    assert checkpoint_weights(model_dir) == (6_000_000_000, {"BF16": 6_000_000_000})
    est = estimate_memory(str(model_dir), facts=measured(model_dir))
    assert est.weights_mib_per_gpu == math.ceil(6e9 / MIB)


def test_only_the_checkpoint_vllm_loads_counts(tmp_path: Path) -> None:
    model_dir = _model_dir_with_config(tmp_path, LLAMA_8B)
    tensor: dict[str, object] = {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}
    _write_header_only(model_dir / "model.safetensors", {"a": tensor})
    _write_header_only(model_dir / "consolidated.safetensors", {"a": tensor, "b": tensor})
    assert checkpoint_weights(model_dir) == (16, {"BF16": 16})


def test_safetensors_index_total_size_wins(tmp_path: Path) -> None:
    model_dir = _model_dir_with_config(tmp_path, LLAMA_8B)
    index = {"metadata": {"total_size": 16_060_522_496}, "weight_map": {}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    est = estimate_memory(str(model_dir), facts=measured(model_dir))
    assert est.source == "safetensors"
    assert est.weights_mib_per_gpu == 15317  # same as computed from config


def test_safetensors_size_is_rescaled_to_the_requested_dtype(tmp_path: Path) -> None:
    model_dir = _model_dir_with_config(tmp_path, LLAMA_8B)  # torch_dtype bfloat16
    index = {"metadata": {"total_size": 16_060_522_496}, "weight_map": {}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    est = estimate_memory(str(model_dir), facts=measured(model_dir), dtype="float32")
    assert est.weights_bytes == 2 * 16_060_522_496
    assert est.kv_bytes_per_token_per_gpu == 2 * 131_072


def test_in_flight_quantization_ignores_the_16_bit_checkpoint_size(tmp_path: Path) -> None:
    model_dir = _model_dir_with_config(tmp_path, LLAMA_8B)
    index = {"metadata": {"total_size": 16_060_522_496}, "weight_map": {}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    est = estimate_memory(str(model_dir), facts=measured(model_dir), quantization="fp8")
    assert est.source == "config"
    assert est.weights_bytes < 10e9


def test_corrupt_safetensors_falls_back_to_config(tmp_path: Path) -> None:
    model_dir = _model_dir_with_config(tmp_path, QWEN_1_5B)
    (model_dir / "model.safetensors").write_bytes(b"\x01\x02")  # truncated download
    est = estimate_memory(str(model_dir), facts=measured(model_dir))
    assert est.source == "config"
    assert est.per_gpu_mib == QWEN_1_5B_TOTAL_MIB


def test_embedding_estimate_from_file_sizes(tmp_path: Path) -> None:
    model_dir = tmp_path / "all-MiniLM-L6-v2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps({"torch_dtype": "float32", "max_position_embeddings": 512})
    )
    (model_dir / "modules.json").write_text("[]")
    with (model_dir / "model.safetensors").open("wb") as f:
        f.truncate(90_868_376)  # all-MiniLM-L6-v2's model.safetensors size
    facts = measured(model_dir)
    assert facts.sentence_transformers and facts.file_bytes == 90_868_376
    # 90,868,376 B = 86.7 MiB -> 87; overhead 1024 + ceil(8.7) = 1033; + 192 = 1312
    est = estimate_embedding_memory(str(model_dir), facts=facts)
    assert est.source == "safetensors"
    assert est.per_gpu_mib == 87 + 1033 + 192
    assert est.model_max_len == 512


# ---------------------------------------------------------------------------- HF cache


def _fake_hub(tmp_path: Path, repo: str, revisions: dict[str, Path], main: str | None) -> Path:
    repo_dir = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    for rev, source in revisions.items():
        snap = repo_dir / "snapshots" / rev
        snap.mkdir(parents=True)
        shutil.copy(source / "config.json", snap / "config.json")
    if main is not None:
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / "main").write_text(main)
    return repo_dir


def test_hf_cache_snapshot_named_by_refs_main_is_used(tmp_path: Path) -> None:
    # "old" holds another model's config: choosing it would change every figure.
    repo_dir = _fake_hub(
        tmp_path,
        "Qwen/Qwen2.5-1.5B-Instruct",
        {"abc": QWEN_1_5B, "old": LLAMA_8B},
        main="abc",
    )
    found = resolve_model_dir("Qwen/Qwen2.5-1.5B-Instruct", tmp_path / "hub")
    assert found == repo_dir / "snapshots" / "abc"
    facts = ModelScanner([], tmp_path / "hub").scan()
    assert list(facts) == ["Qwen/Qwen2.5-1.5B-Instruct"]
    est = estimate_memory("Qwen/Qwen2.5-1.5B-Instruct", facts=facts["Qwen/Qwen2.5-1.5B-Instruct"])
    assert est.source == "config"
    assert est.per_gpu_mib == QWEN_1_5B_TOTAL_MIB


def test_hf_cache_without_refs_uses_a_snapshot_holding_config(tmp_path: Path) -> None:
    repo_dir = _fake_hub(tmp_path, "meta-llama/Llama-3.1-8B-Instruct", {"r1": LLAMA_8B}, None)
    (repo_dir / "snapshots" / "empty").mkdir()
    found = resolve_model_dir("meta-llama/Llama-3.1-8B-Instruct", tmp_path / "hub")
    assert found == repo_dir / "snapshots" / "r1"


def test_hf_hub_cache_environment_variable_is_honoured(tmp_path: Path) -> None:
    _fake_hub(tmp_path, "Qwen/Qwen2.5-7B-Instruct-AWQ", {"abc": QWEN_7B_AWQ}, "abc")
    hub = hub_cache_dir({"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": "/elsewhere"})
    facts = ModelScanner([], hub).scan()["Qwen/Qwen2.5-7B-Instruct-AWQ"]
    est = estimate_memory("Qwen/Qwen2.5-7B-Instruct-AWQ", facts=facts)
    assert est.per_gpu_mib == QWEN_7B_AWQ_TOTAL_MIB


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}, "/c"),
        ({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}, "/h/hub"),
        ({"XDG_CACHE_HOME": "/x", "HOME": "/home/u"}, "/x/huggingface/hub"),
        ({"HOME": "/home/u"}, "/home/u/.cache/huggingface/hub"),
        ({"HF_HOME": "~/hf", "HOME": "/home/u"}, "/home/u/hf/hub"),
        ({}, "~/.cache/huggingface/hub"),
    ],
)
def test_hub_cache_dir_reads_only_the_mapping_it_is_given(
    env: dict[str, str], expected: str
) -> None:
    assert hub_cache_dir(env) == Path(expected)


def test_missing_local_path_is_not_looked_up_in_the_cache(tmp_path: Path) -> None:
    assert resolve_model_dir(str(tmp_path / "nowhere"), tmp_path / "hub") is None
    assert resolve_model_dir("", tmp_path / "hub") is None


def test_embedding_bare_name_is_found_under_sentence_transformers(tmp_path: Path) -> None:
    repo_dir = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    snap = repo_dir / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    (snap / "model.safetensors").write_bytes(b"\0" * 4096)
    models = ModelScanner([], tmp_path / "hub").scan()
    facts = find_facts(models, "all-MiniLM-L6-v2", embedding=True)
    assert find_facts(models, "all-MiniLM-L6-v2") is None  # an LLM name is not rewritten
    est = estimate_embedding_memory("all-MiniLM-L6-v2", facts=facts)
    assert est.weights_bytes == 4096


# ---------------------------------------------------------------------------- scanning


def _tiny(path: Path, **config: Any) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    return path


def test_scan_finds_model_directories_under_the_roots_to_a_bounded_depth(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _tiny(root / "a")
    _tiny(root / "org" / "b")
    _tiny(root / "x" / "y" / "c")  # depth 3: found
    _tiny(root / "x" / "y" / "z" / "d")  # depth 4: too deep
    _tiny(root / ".cache" / "e")  # hidden
    _tiny(root / "a" / "inner")  # inside a model directory: not a model of its own
    hub = root / "hub"  # the hub cache under a root is listed by repo id, not by path
    _fake_hub(root, "Qwen/Qwen2.5-1.5B-Instruct", {"abc": QWEN_1_5B}, "abc")
    found = ModelScanner([str(root)], hub).scan()
    assert set(found) == {
        "Qwen/Qwen2.5-1.5B-Instruct",
        str(root / "a"),
        str(root / "org" / "b"),
        str(root / "x" / "y" / "c"),
    }
    assert found[str(root / "a")].path == str(root / "a")


def test_scan_adds_the_paths_engines_were_given(tmp_path: Path) -> None:
    elsewhere = _tiny(tmp_path / "elsewhere" / "m", num_hidden_layers=2)
    scanner = ModelScanner([str(tmp_path / "roots")], tmp_path / "hub")
    assert scanner.scan() == {}
    given = str(elsewhere) + "/"  # as a user might spell it
    found = scanner.scan([given, "org/not-a-path", str(tmp_path / "gone")])
    assert list(found) == [str(elsewhere)]
    assert find_facts(found, given) is found[str(elsewhere)]


def test_scan_rereads_a_directory_only_when_its_files_change(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    model = _model_dir_with_config(root, LLAMA_8B)
    scanner = ModelScanner([str(root)], tmp_path / "hub")
    first = scanner.scan()
    assert scanner.reads == 1
    assert scanner.scan() == first and scanner.reads == 1  # a heartbeat reads no header
    _write_header_only(
        model / "model.safetensors", {"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}
    )
    again = scanner.scan()
    assert scanner.reads == 2
    assert again[str(model)].weights_bytes == 8
    shutil.rmtree(model)
    assert scanner.scan() == {}


def test_model_keys_and_paths() -> None:
    assert not is_path_like("Qwen/Qwen2.5-7B") and not is_path_like("gpt2")
    assert is_path_like("/m/x") and is_path_like("./x") and is_path_like("a/b/c")
    assert model_key("/m//x/../y/") == "/m/y"
    assert model_key("~/m/x/") == "~/m/x"
    assert model_key("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"


# ---------------------------------------------------------------------------- Redis


def test_facts_are_published_and_replaced_as_a_whole(any_redis: redis.Redis) -> None:
    a = ModelFacts("org/a", "/hub/a", layers=2)
    b = ModelFacts("/m/b", "/m/b", weights_bytes_by_dtype={"BF16": 8})
    publish_model_facts(any_redis, "h1", {"org/a": a, "/m/b": b})
    assert host_model_facts(any_redis, "h1") == {"org/a": a, "/m/b": b}
    publish_model_facts(any_redis, "h1", {"/m/b": b})
    assert host_model_facts(any_redis, "h1") == {"/m/b": b}  # a is gone
    assert model_facts_published(any_redis, "h1")
    publish_model_facts(any_redis, "h1", {})
    assert not model_facts_published(any_redis, "h1")
    assert hosts_model_facts(any_redis, ["h1", "h2"]) == {"h1": {}, "h2": {}}


def test_an_entry_that_does_not_parse_is_left_out(any_redis: redis.Redis) -> None:
    a = ModelFacts("org/a", "/hub/a")
    publish_model_facts(any_redis, "h1", {"org/a": a})
    any_redis.hset(keys.model_facts("h1"), "bad", "{not json")
    assert host_model_facts(any_redis, "h1") == {"org/a": a}


def test_heartbeat_publishes_when_the_scan_changed_or_redis_lost_it(
    tmp_path: Path, fake_redis: redis.Redis
) -> None:
    root = tmp_path / "root"
    _tiny(root / "a")
    publisher = ModelFactsPublisher(ModelScanner([str(root)], tmp_path / "hub"), interval_s=0)
    ctx: Any = SimpleNamespace(host="h1", registry=SimpleNamespace(r=fake_redis))
    assert publisher.publish(ctx)
    assert list(host_model_facts(fake_redis, "h1")) == [str(root / "a")]
    assert not publisher.publish(ctx)  # nothing changed: nothing written
    fake_redis.flushall()  # Redis lost it
    assert publisher.publish(ctx)
    _tiny(root / "b")
    assert publisher.publish(ctx)
    assert sorted(host_model_facts(fake_redis, "h1")) == [str(root / "a"), str(root / "b")]


def test_heartbeat_rescans_at_once_for_a_new_engine_path(
    tmp_path: Path, fake_redis: redis.Redis
) -> None:
    publisher = ModelFactsPublisher(ModelScanner([], tmp_path / "hub"), interval_s=3600)
    ctx: Any = SimpleNamespace(host="h1", registry=SimpleNamespace(r=fake_redis))
    publisher.publish(ctx)
    model = _tiny(tmp_path / "m")
    assert not publisher.publish(ctx)  # not due yet
    assert publisher.publish(ctx, [str(model)])  # an engine's path: read now
    assert list(host_model_facts(fake_redis, "h1")) == [str(model)]
