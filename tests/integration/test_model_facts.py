"""Model facts are measured on the GPU host: two real workers as two hosts (loopback
addresses 127.0.0.2 and .3, mock GPUs), each with its own Hugging Face cache and model
root; one API, in this process, that sees no model files of its own.

Host b's root holds ``tiny-b``: the config below and a real safetensors file of two
BF16 tensors [1000, 64]: 2 x 128,000 B = 256,000 B of weights. Its name states no
size, so only b's facts can size it. By hand, on one GPU (see app/core/memory):
  weights   ceil(256,000 / 2**20) = 1 MiB
  KV        2 (K, V) x 2 layers x 2 KV heads x 16 head_dim (64 / 4 heads) x 2 B = 256 B/token,
            for min(4096 max positions, default 32768) = 4096 tokens: 1,048,576 B = 1 MiB
  overhead  1536 + ceil(1 x 5%) = 1537 MiB;  headroom 192 MiB
  total     1 + 1 + 1537 + 192 = 1731 MiB per GPU
Host a's cache holds ``org/tiny-hub`` (the same config, no weights).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import create_app
from app.settings import Settings
from tests.integration.harness import AppServer, ClusterEnv, wait_until

pytestmark = pytest.mark.integration
M = "/v1/management"
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
    "torch_dtype": "bfloat16",
}
TINY_B_MIB = 1731


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    """A safetensors file of zero-filled tensors: name -> (dtype, shape, bytes)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape, size) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


@dataclass
class TwoHosts:
    env: ClusterEnv
    api: AppServer
    tiny_b: str

    def post(self, path: str, body: dict[str, Any], **params: Any) -> httpx.Response:
        return httpx.post(f"{self.api.url}{path}", json=body, params=params, timeout=90)

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.api.url}{path}", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def dry_run(self, **engine: Any) -> dict[str, Any]:
        preset = {"version": 1, "name": "probe", "engines": [{"name": "e", **engine}]}
        r = self.post(f"{M}/presets/apply", {"preset": preset}, dry_run="true")
        assert r.status_code == 200, r.text
        row: dict[str, Any] = r.json()["plan"][0]
        return row


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    tmp = tmp_path_factory.mktemp("facts")
    tiny_b = tmp / "b-models" / "tiny-b"
    tiny_b.mkdir(parents=True)
    (tiny_b / "config.json").write_text(json.dumps(TINY_CONFIG))
    write_safetensors(
        tiny_b / "model.safetensors",
        {
            "model.embed_tokens.weight": ("BF16", [1000, 64], 128_000),
            "lm_head.weight": ("BF16", [1000, 64], 128_000),
        },
    )
    snap = tmp / "hf-a" / "hub" / "models--org--tiny-hub" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp / "a-models").mkdir()

    env = ClusterEnv.create(tmp, SAGELLM_PORT_RANGE="18650-18679")
    for name, address in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
        hf = tmp / f"hf-{name}"
        env.start_worker(
            name,
            address,
            HF_HOME=str(hf),
            HF_HUB_CACHE=str(hf / "hub"),
            SAGELLM_MODEL_ROOTS=str(tmp / f"{name}-models"),
        )
    # The API's own cache is empty: whatever it knows of the models came from the hosts.
    settings = Settings.from_env({k: v for k, v in env.env.items() if k.startswith("SAGELLM_")})
    api = AppServer(create_app(settings))
    try:
        yield TwoHosts(env, api, str(tiny_b))
    finally:
        api.close()
        env.close()


def test_a_model_only_on_host_b_is_estimated_from_bs_facts_and_placed_there(
    two: TwoHosts,
) -> None:
    plan = two.dry_run(model=two.tiny_b, served_model_name="tiny-b")
    assert plan["action"] == "start", plan
    assert plan["host"] == "b"
    assert plan["estimate"] == (
        "tiny-b: 0.0 GiB weights + 0.0 GiB KV (4096 tokens) + 1.5 GiB overhead + 0.2 GiB "
        "headroom = 1.7 GiB per GPU (size from safetensors; measured on host b)"
    )
    assert plan["memory_per_gpu_gb"] == pytest.approx(TINY_B_MIB / 1024, abs=0.01)

    r = two.post(
        f"{M}/engines",
        {"model": two.tiny_b, "served_model_name": "tiny-b"},
        wait="true",
        timeout="60",
    )
    assert r.status_code == 200, r.text
    engine = r.json()["engine"]
    try:
        assert engine["state"] == "RUNNING" and engine["host"] == "b"
        assert engine["base_url"].startswith("http://127.0.0.3:")
        assert engine["memory_per_gpu_mib"] == TINY_B_MIB
    finally:
        httpx.delete(f"{two.api.url}{M}/engines/{engine['id']}", timeout=30)
        wait_until(
            lambda: two.get(f"{M}/engines/{engine['id']}")["state"] == "STOPPED",
            30,
            what="stopped",
        )


def test_a_local_model_pinned_to_the_host_without_it_is_refused_with_the_reason(
    two: TwoHosts,
) -> None:
    r = two.post(f"{M}/engines", {"model": two.tiny_b, "served_model_name": "t", "host": "a"})
    assert r.status_code == 409, r.text
    assert r.json()["reasons"] == ["host a: does not have t's model files (host b has them)"]


def test_a_hub_model_goes_to_the_host_whose_cache_has_it(two: TwoHosts) -> None:
    plan = two.dry_run(model="org/tiny-hub")
    assert plan["host"] == "a"
    assert plan["estimate"].endswith("(size from config; measured on host a)")


def test_a_model_on_no_host_falls_back_to_its_name_and_says_so(two: TwoHosts) -> None:
    plan = two.dry_run(model="org/Nowhere-1B")
    assert plan["action"] == "start"
    assert plan["estimate"].endswith("(size from name; no host has its files on disk)")
    r = two.post(f"{M}/engines", {"model": "org/nowhere-model"}, wait="false")
    assert r.status_code == 400
    assert "no host has its files on disk" in r.json()["message"]


def test_models_lists_each_hosts_models_with_facts_and_estimate(two: TwoHosts) -> None:
    body = two.get(f"{M}/models")
    assert body["default_max_model_len"] == 32768
    hosts = {h["host"]: h for h in body["hosts"]}
    assert set(hosts) == {"a", "b"} and hosts["a"]["up"] and hosts["b"]["up"]
    assert [m["model"] for m in hosts["a"]["models"]] == ["org/tiny-hub"]
    assert [m["model"] for m in hosts["b"]["models"]] == [two.tiny_b]
    tiny = hosts["b"]["models"][0]
    assert tiny["path"] == two.tiny_b
    facts = tiny["facts"]
    assert facts["weights_bytes"] == 256_000
    assert facts["weights_bytes_by_dtype"] == {"BF16": 256_000}
    assert (facts["layers"], facts["kv_heads"], facts["head_dim"]) == (2, 2, 16)
    assert (facts["max_len"], facts["architecture"], facts["quantization"]) == (
        4096,
        "LlamaForCausalLM",
        None,
    )
    assert "linears" not in facts  # arithmetic's shapes stay internal
    assert tiny["estimate"]["per_gpu_mib"] == TINY_B_MIB
    assert tiny["estimate"]["max_model_len"] == 4096
    assert tiny["estimate"]["source"] == "safetensors"
