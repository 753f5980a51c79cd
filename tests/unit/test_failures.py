"""Crash classification (``app.core.failures``) on log tails as vLLM and Hugging Face
print them."""
# ruff: noqa: E501 - log lines are quoted as the engines print them, one message a line

from __future__ import annotations

import pytest

from app.core.failures import NOT_RESTARTABLE, Failure, Reason, classify, current_run

HEADER = "=== sagellm 2025-01-02 10:11:12 engine e-1: vllm serve /models/x --port 8000\n"

KV_V0 = """\
INFO 01-02 10:11:40 model_runner.py:1041] Loading model weights took 14.9889 GB
INFO 01-02 10:11:45 gpu_executor.py:122] # GPU blocks: 2637, # CPU blocks: 2048
Process SpawnProcess-1:
Traceback (most recent call last):
  File "/usr/lib/python3.10/multiprocessing/process.py", line 314, in _bootstrap
    self.run()
  File "/opt/venv/lib/python3.10/site-packages/vllm/worker/worker.py", line 486, in raise_if_cache_size_invalid
    raise ValueError(
ValueError: The model's max seq len (131072) is larger than the maximum number of tokens that can be stored in KV cache (42192). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.
"""

KV_V1 = """\
(EngineCore_0 pid=2301) ERROR 07-10 09:12:03 [core.py:586] EngineCore failed to start.
(EngineCore_0 pid=2301) ERROR 07-10 09:12:03 [core.py:586] Traceback (most recent call last):
(EngineCore_0 pid=2301) ERROR 07-10 09:12:03 [core.py:586]   File "/opt/venv/lib/python3.12/site-packages/vllm/v1/core/kv_cache_utils.py", line 704, in check_enough_kv_cache_memory
(EngineCore_0 pid=2301) ERROR 07-10 09:12:03 [core.py:586] ValueError: To serve at least one request with the models's max seq len (131072), (16.00 GiB KV cache is needed, which is larger than the available KV cache memory (5.15 GiB). Based on the available memory, the estimated maximum model length is 42192. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""

FREE_MEMORY = """\
INFO 07-10 09:10:58 [gpu_model_runner.py:1770] Starting to load model /models/Qwen2.5-72B...
ERROR 07-10 09:10:59 [core.py:586] EngineCore failed to start.
ERROR 07-10 09:10:59 [core.py:586]   File "/opt/venv/lib/python3.12/site-packages/vllm/v1/worker/gpu_worker.py", line 160, in init_device
ERROR 07-10 09:10:59 [core.py:586]     raise ValueError(
ERROR 07-10 09:10:59 [core.py:586] ValueError: Free memory on device (21.96/79.25 GiB) on startup is less than desired GPU memory utilization (0.7, 55.48 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.
"""

OOM = """\
  File "/opt/venv/lib/python3.12/site-packages/torch/nn/modules/linear.py", line 125, in forward
    return F.linear(input, self.weight, self.bias)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity of 79.25 GiB of which 1.02 GiB is free. Including non-PyTorch memory, this process has 78.22 GiB memory in use.
"""

PORT = """\
INFO:     Started server process [4242]
INFO:     Waiting for application startup.
INFO:     Application startup complete.
ERROR:    [Errno 98] error while attempting to bind on address ('0.0.0.0', 8000): address already in use
INFO:     Waiting for application shutdown.
"""

NOT_A_MODEL = """\
Traceback (most recent call last):
  File "/opt/venv/bin/vllm", line 8, in <module>
  File "/opt/venv/lib/python3.10/site-packages/transformers/utils/hub.py", line 469, in cached_file
    raise EnvironmentError(
OSError: /models/Qwen2.5-7B-Instrcut is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'
If this is a private repository, make sure to pass a token having permission to this repo either by logging in with `huggingface-cli login` or by passing `token=<your_token>`
"""

GATED = """\
huggingface_hub.errors.GatedRepoError: 401 Client Error. (Request ID: Root=1-65f0-abc)

Cannot access gated repo for url https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/resolve/main/config.json.
Access to model meta-llama/Llama-3.1-8B-Instruct is restricted. You must have access to it and be authenticated to access it. Please log in.
"""

REPO_ID = """\
huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/models/a/b/c'. Use `repo_type` argument if needed.
"""

NO_MODULE = """\
Traceback (most recent call last):
  File "/opt/venv/bin/vllm", line 5, in <module>
    from vllm.entrypoints.cli.main import main
ModuleNotFoundError: No module named 'vllm'
"""


def run(body: str) -> str:
    return HEADER + body


@pytest.mark.parametrize(
    ("tail", "reason", "evidence"),
    [
        (KV_V0, Reason.KV_CACHE_TOO_SMALL, "max seq len (131072)"),
        (KV_V1, Reason.KV_CACHE_TOO_SMALL, "estimated maximum model length is 42192"),
        (FREE_MEMORY, Reason.INSUFFICIENT_FREE_MEMORY, "Free memory on device (21.96/79.25"),
        (OOM, Reason.CUDA_OOM, "CUDA out of memory"),
        (PORT, Reason.PORT_IN_USE, "address already in use"),
        (NOT_A_MODEL, Reason.MODEL_NOT_FOUND, "is not a local folder"),
        (GATED, Reason.MODEL_NOT_FOUND, "GatedRepoError"),
        (REPO_ID, Reason.MODEL_NOT_FOUND, "Repo id must be in the form"),
        (NO_MODULE, Reason.MISSING_RUNTIME, "No module named 'vllm'"),
    ],
)
def test_each_message_vllm_users_hit_has_its_reason_and_evidence(
    tail: str, reason: Reason, evidence: str
) -> None:
    f = classify(1, run(tail))
    assert f.reason == reason
    assert evidence in f.evidence
    assert f.advice and f.exit_code == 1 and f.signal is None


def test_kv_cache_message_gives_both_numbers() -> None:
    for tail in (KV_V0, KV_V1):
        f = classify(1, run(tail))
        assert f.details["max_model_len"] == 131072
        assert f.details["kv_cache_tokens"] == 42192
        assert "42192" in f.advice


def test_kv_cache_without_an_estimate_is_sized_from_the_gib_figures() -> None:
    tail = KV_V1.replace(
        " Based on the available memory, the estimated maximum model length is 42192.", ""
    )
    f = classify(1, run(tail))
    assert f.reason == Reason.KV_CACHE_TOO_SMALL
    assert f.details["kv_cache_tokens"] == int(131072 * 5.15 / 16.0)


def test_free_memory_message_wrapped_over_two_lines_is_still_read() -> None:
    tail = (
        "Free memory on device (21.96/79.25 GiB) on startup is less than\n"
        "desired GPU memory utilization (0.7, 55.48 GiB)\n"
    )
    f = classify(1, run(tail))
    assert f.reason == Reason.INSUFFICIENT_FREE_MEMORY
    assert f.details == {
        "free_gib": 21.96,
        "total_gib": 79.25,
        "gpu_memory_utilization": 0.7,
        "requested_gib": 55.48,
    }
    assert "on startup is less than desired GPU memory" in f.evidence
    assert "55.48 GiB" in f.advice


def test_newer_vllm_naming_the_device_is_read_too() -> None:
    tail = FREE_MEMORY.replace("on device (", "on device cuda:0 (")
    assert classify(1, run(tail)).reason == Reason.INSUFFICIENT_FREE_MEMORY


def test_oom_names_the_gpu() -> None:
    assert classify(1, run(OOM)).details == {"gpu": 0}


def test_gated_repo_advice_says_token() -> None:
    assert "HF_TOKEN" in classify(1, run(GATED)).advice


def test_only_the_latest_run_of_the_log_is_read() -> None:
    # The log is appended across restarts: the first run ran out of KV cache, the
    # relaunch died of something else; the old message must not classify it.
    log = run(KV_V0) + "=== sagellm 2025-01-02 10:12:00: remediated\n" + run("Segmentation fault\n")
    f = classify(-11, log)
    assert f.reason == Reason.KILLED_BY_SIGNAL
    assert "SIGSEGV" in f.evidence
    assert current_run(log) == "Segmentation fault\n"


def test_a_warning_about_an_optional_module_is_not_a_missing_runtime() -> None:
    tail = (
        "WARNING 07-10 09:10:00 [utils.py:12] No module named 'flash_attn'; ModuleNotFoundError: "
        "No module named 'flash_attn'\nValueError: something else broke\n"
    )
    f = classify(1, run(tail))
    assert f.reason == Reason.UNKNOWN
    assert f.evidence == "ValueError: something else broke"


def test_exit_127_without_a_message_is_a_missing_runtime() -> None:
    f = classify(127, run(""))
    assert f.reason == Reason.MISSING_RUNTIME and "127" in f.evidence


def test_kill_9_is_killed_by_signal_and_mentions_the_oom_killer() -> None:
    f = classify(-9, run("INFO serving\n"))
    assert (f.reason, f.signal, f.exit_code) == (Reason.KILLED_BY_SIGNAL, 9, -9)
    assert "SIGKILL" in f.evidence and "out-of-memory killer" in f.advice
    assert classify(137, run("")).signal == 9  # 128 + 9, as a shell reports it


def test_the_root_cause_wins_over_our_own_kill() -> None:
    assert classify(-15, run(OOM), cause=Reason.START_TIMEOUT).reason == Reason.CUDA_OOM
    timeout = classify(-15, run("INFO loading\n"), cause=Reason.START_TIMEOUT)
    assert timeout.reason == Reason.START_TIMEOUT and timeout.evidence == "INFO loading"


@pytest.mark.parametrize(
    ("cause", "without_a_log", "advice"),
    [
        (Reason.START_TIMEOUT, "not ready before the start timeout", "SAGELLM_START_TIMEOUT_S"),
        (Reason.UNRESPONSIVE, "its health checks failed", "stopped answering its health checks"),
    ],
)
def test_our_own_kill_shows_the_last_line_or_says_what_we_saw(
    cause: Reason, without_a_log: str, advice: str
) -> None:
    f = classify(-15, run("INFO still loading\n"), cause=cause)
    assert (f.reason, f.evidence, f.exit_code, f.signal) == (cause, "INFO still loading", -15, 15)
    assert advice in f.advice
    silent = classify(-9, run(""), cause=cause)
    assert (silent.reason, silent.evidence, silent.signal) == (cause, without_a_log, 9)
    assert silent.advice == f.advice


def test_unknown_exit_shows_the_last_line() -> None:
    f = classify(3, run("fake vllm: failing at start as asked (exit 3)\n"))
    assert f.reason == Reason.UNKNOWN
    assert f.evidence == "fake vllm: failing at start as asked (exit 3)"


def test_not_restartable_reasons_and_round_trip() -> None:
    assert {Reason.MODEL_NOT_FOUND, Reason.MISSING_RUNTIME} == NOT_RESTARTABLE
    f = classify(1, run(NOT_A_MODEL))
    assert not f.restartable
    assert classify(1, run(OOM)).restartable
    assert Failure.from_dict(f.to_dict()) == f


def test_engine_show_says_why_it_failed_and_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from app.cli import engines as cli_engines

    failure = classify(1, run(FREE_MEMORY)).to_dict()
    record = {"id": "eng-1", "state": "FAILED", "last_error": "x", "failure": failure}
    monkeypatch.setattr(cli_engines, "connect", lambda: None)
    monkeypatch.setattr(cli_engines, "resolve_engine", lambda _client, _ref: record)
    res = CliRunner().invoke(cli_engines.engine_show, ["eng-1"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[1].startswith("why: insufficient_free_memory: ERROR 07-10")
    assert "ValueError: Free memory on device (21.96/79.25 GiB)" in lines[1]
    assert lines[2].startswith("what to do: the GPU had 21.96 GiB free")
    assert "reason: insufficient_free_memory" in res.output  # the record's field, in full
