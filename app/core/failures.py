"""Why an engine died: a named reason read from its exit status and its log.

``classify(exit_code, log_tail)`` returns a ``Failure``: the reason, the line that
shows it (``evidence``), a sentence saying what to do (``advice``), and the numbers the
message carried (``details``: vLLM's max length and the tokens its KV cache holds, the
free and requested GiB, ...), which remediation uses.

Reasons, most specific first (a CUDA out-of-memory often ends in a secondary error;
the root cause wins):

* ``kv_cache_too_small``: vLLM's max length needs more KV cache than fits;
* ``insufficient_free_memory``: the GPU had less free memory at start than vLLM's
  ``--gpu-memory-utilization`` asked for (someone else uses it);
* ``cuda_oom``: CUDA out of memory while loading or serving;
* ``port_in_use``: the engine could not bind its port;
* ``model_not_found``: no such local path or Hugging Face repo, or a gated repo
  without a token;
* ``missing_runtime``: the executable or a Python module it needs is not installed;
* ``start_timeout`` / ``unresponsive``: we stopped it (not ready in time, failed its
  health checks), said by the caller;
* ``killed_by_signal``: it died of a signal and said nothing we recognise;
* ``unknown``.

``model_not_found`` and ``missing_runtime`` are not fixed by a restart
(``NOT_RESTARTABLE``). Pure: no disk, no processes; the caller reads the log.
"""

from __future__ import annotations

import enum
import re
import signal as signals
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Reason(enum.StrEnum):
    KV_CACHE_TOO_SMALL = "kv_cache_too_small"
    INSUFFICIENT_FREE_MEMORY = "insufficient_free_memory"
    CUDA_OOM = "cuda_oom"
    PORT_IN_USE = "port_in_use"
    MODEL_NOT_FOUND = "model_not_found"
    MISSING_RUNTIME = "missing_runtime"
    START_TIMEOUT = "start_timeout"
    UNRESPONSIVE = "unresponsive"
    KILLED_BY_SIGNAL = "killed_by_signal"
    UNKNOWN = "unknown"


# A restart runs the same command on the same disk: these fail the same way again.
NOT_RESTARTABLE = frozenset({Reason.MODEL_NOT_FOUND, Reason.MISSING_RUNTIME})
# What remediation can act on (a shorter max length, another GPU).
MEMORY_REASONS = frozenset(
    {Reason.KV_CACHE_TOO_SMALL, Reason.INSUFFICIENT_FREE_MEMORY, Reason.CUDA_OOM}
)
# Exit statuses of a shell that could not run the command (POSIX).
_NOT_FOUND_CODES = {127: "command not found", 126: "command not executable"}
# The line ``workers.host.processes.spawn`` writes before each start of an engine.
_RUN_HEADER = re.compile(r"^=== sagellm \S+ \S+ engine \S+: ", re.M)
_OUR_NOTE = re.compile(r"^=== sagellm ")


@dataclass(frozen=True)
class Failure:
    """Why an engine's process ended, for a person and for remediation."""

    reason: str
    evidence: str  # the log line (or exit status) that shows it
    advice: str  # what to do, one sentence
    exit_code: int | None = None  # as the OS reported it; negative: killed by a signal
    signal: int | None = None
    details: dict[str, Any] = field(default_factory=dict)  # numbers the message carried
    at: float | None = None  # when it was recorded (set by the caller)

    @property
    def restartable(self) -> bool:
        """False when a restart would fail the same way (see ``NOT_RESTARTABLE``)."""
        return self.reason not in NOT_RESTARTABLE

    def summary(self) -> str:
        """One line: the reason and its evidence."""
        return f"{self.reason}: {self.evidence}" if self.evidence else self.reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "evidence": self.evidence,
            "advice": self.advice,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "details": dict(self.details),
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Failure:
        return cls(
            reason=str(d.get("reason", Reason.UNKNOWN)),
            evidence=str(d.get("evidence", "")),
            advice=str(d.get("advice", "")),
            exit_code=d.get("exit_code"),
            signal=d.get("signal"),
            details=dict(d.get("details") or {}),
            at=d.get("at"),
        )


# ---------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class _Rule:
    reason: Reason
    pattern: re.Pattern[str]
    advice: Callable[[re.Match[str]], str]
    details: Callable[[re.Match[str]], dict[str, Any]] = lambda m: {}
    # Only on a line that reports an error, not in a warning (a missing optional module
    # is logged as a warning by engines that then run fine).
    errors_only: bool = False


def _words(*parts: str) -> str:
    """A pattern whose spaces match any whitespace (a message wrapped over lines)."""
    return r"\s+".join(p.replace(" ", r"\s+") for p in parts)


def _kv_v0_details(m: re.Match[str]) -> dict[str, Any]:
    return {"max_model_len": int(m["asked"]), "kv_cache_tokens": int(m["fits"])}


def _kv_v1_details(m: re.Match[str]) -> dict[str, Any]:
    asked = int(m["asked"])
    out: dict[str, Any] = {"max_model_len": asked}
    if m["estimate"]:
        out["kv_cache_tokens"] = int(m["estimate"])
    else:  # the KV cache is linear in the length: what fits is asked x available / needed
        needed, available = float(m["needed"]), float(m["available"])
        if needed > 0:
            out["kv_cache_tokens"] = int(asked * available / needed)
    out["kv_cache_needed_gib"], out["kv_cache_available_gib"] = (
        float(m["needed"]),
        float(m["available"]),
    )
    return out


def _kv_advice(m: re.Match[str]) -> str:
    d = _kv_v0_details(m) if "fits" in m.re.groupindex else _kv_v1_details(m)
    fits = d.get("kv_cache_tokens")
    if fits:
        return (
            f"ask for max_model_len {fits} or less, or for more GPU memory "
            "(required_memory_gb) so the KV cache holds the full length"
        )
    return "ask for a smaller max_model_len or for more GPU memory (required_memory_gb)"


def _free_memory_details(m: re.Match[str]) -> dict[str, Any]:
    return {
        "free_gib": float(m["free"]),
        "total_gib": float(m["total"]),
        "gpu_memory_utilization": float(m["util"]),
        "requested_gib": float(m["requested"]),
    }


def _oom_details(m: re.Match[str]) -> dict[str, Any]:
    return {"gpu": int(m["gpu"])} if m["gpu"] is not None else {}


def _model_advice(m: re.Match[str]) -> str:
    text = m.group(0).lower()
    if "gated" in text or "restricted" in text or "401" in text:
        return (
            "the repository is gated or private: accept its license on huggingface.co and "
            "give the worker a token (HF_TOKEN), or use a model you can access"
        )
    if "outgoing traffic has been disabled" in text or "localentrynotfound" in text:
        return (
            "the model is not in this host's Hugging Face cache and the hub is offline "
            "(HF_HUB_OFFLINE): download it on the host first, or allow downloads"
        )
    return (
        "check the model name: a Hugging Face repo id (org/name) or a local path that exists "
        "on the host (`sagellm models` lists what each host has)"
    )


def _runtime_details(m: re.Match[str]) -> dict[str, Any]:
    module = m.groupdict().get("module")
    return {"module": module} if module else {}


def _runtime_advice(m: re.Match[str] | None) -> str:
    module = m.groupdict().get("module") if m is not None else None
    if module:
        return (
            f"install the Python package that provides {module!r} in the environment the "
            "worker starts engines from (for vLLM: pip install 'sagellm[vllm]')"
        )
    return (
        "install the engine's runtime on the host (for vLLM: pip install 'sagellm[vllm]') "
        "and its libraries (CUDA), then start the engine again"
    )


_RULES: tuple[_Rule, ...] = (
    # vLLM V0: "The model's max seq len (131072) is larger than the maximum number of
    # tokens that can be stored in KV cache (42192). Try increasing ..."
    _Rule(
        Reason.KV_CACHE_TOO_SMALL,
        re.compile(
            _words(
                r"max seq len \((?P<asked>\d+)\) is larger than the maximum number of",
                r"tokens that can be stored in KV cache \((?P<fits>\d+)\)",
            )
        ),
        _kv_advice,
        _kv_v0_details,
    ),
    # vLLM V1: "To serve at least one request with the models's max seq len (131072),
    # (16.00 GiB KV cache is needed, which is larger than the available KV cache memory
    # (5.15 GiB). Based on the available memory, the estimated maximum model length is
    # 42192. Try increasing ..."
    _Rule(
        Reason.KV_CACHE_TOO_SMALL,
        re.compile(
            _words(
                r"max seq len \((?P<asked>\d+)\), \((?P<needed>[\d.]+) GiB KV cache is needed,",
                r"which is larger than the available KV cache memory",
                r"\((?P<available>[\d.]+) GiB\)\.",
            )
            + r"(?:\s+Based\s+on\s+the\s+available\s+memory,\s+the\s+estimated\s+maximum"
            r"\s+model\s+length\s+is\s+(?P<estimate>\d+))?"
        ),
        _kv_advice,
        _kv_v1_details,
    ),
    _Rule(
        Reason.KV_CACHE_TOO_SMALL,
        re.compile(_words("No available memory for the cache blocks")),
        lambda m: "give the engine more GPU memory (required_memory_gb) or a smaller model",
    ),
    # "Free memory on device (21.96/79.25 GiB) on startup is less than desired GPU
    # memory utilization (0.7, 55.48 GiB)" (newer vLLM names the device: "cuda:0").
    _Rule(
        Reason.INSUFFICIENT_FREE_MEMORY,
        re.compile(
            _words(
                r"Free memory on device(?:\s+\S+)? \((?P<free>[\d.]+)/(?P<total>[\d.]+) GiB\)",
                r"on startup is less than desired GPU memory utilization",
                r"\((?P<util>[\d.]+), (?P<requested>[\d.]+) GiB\)",
            )
        ),
        lambda m: (
            f"the GPU had {m['free']} GiB free but the engine needs {m['requested']} GiB: "
            "another process uses it; free it, or start the engine on another GPU"
        ),
        _free_memory_details,
    ),
    _Rule(
        Reason.CUDA_OOM,
        re.compile(
            r"(?:torch\.(?:cuda\.)?OutOfMemoryError|CUDA out of memory|CUDA error: out of memory"
            r"|cudaErrorMemoryAllocation)(?:[^\n]*?GPU (?P<gpu>\d+) has a total capacity)?"
        ),
        lambda m: (
            "the GPU ran out of memory: free it, ask for more memory (required_memory_gb), "
            "a smaller max_model_len, or another GPU"
        ),
        _oom_details,
    ),
    _Rule(
        Reason.PORT_IN_USE,
        # vLLM / uvicorn, or ours (``workers.agent.lifecycle`` checks the port first)
        re.compile(r"address already in use|is in use by a program that is not ours", re.I),
        lambda m: (
            "another program listens on the engine's port: stop it or start again "
            "without a fixed port"
        ),
    ),
    _Rule(
        Reason.MODEL_NOT_FOUND,
        re.compile(
            r"is not a local folder and is not a valid model identifier"
            r"|RepositoryNotFoundError|Repository Not Found for url"
            r"|GatedRepoError|Cannot access gated repo|Access to model \S+ is restricted"
            r"|HFValidationError|Repo id must (?:be in the form|use alphanumeric)"
            r"|Invalid repository ID or local directory specified"
            r"|LocalEntryNotFoundError|outgoing traffic has been disabled"
        ),
        _model_advice,
        errors_only=True,
    ),
    _Rule(
        Reason.MISSING_RUNTIME,
        re.compile(
            r"(?:ModuleNotFoundError|ImportError): No module named '(?P<module>[^']+)'"
            r"|ImportError: [^\n]*cannot open shared object file"
            r"|(?:command not found|No such file or directory)(?=[^\n]*(?:vllm|python))"
            # ours: the executable could not be run, or the runtime is not installed
            r"|cannot execute '[^']*'|install vLLM on this host"
        ),
        _runtime_advice,
        _runtime_details,
        errors_only=True,
    ),
)


def current_run(log: str) -> str:
    """The part of an engine's log written by its latest process: after the last line
    ``workers.host.processes.spawn`` wrote before starting it (the log is appended
    across restarts, and an old run's error must not classify a new one); our own
    ``=== sagellm`` notes are left out."""
    run = log
    starts = list(_RUN_HEADER.finditer(log))
    if starts:
        newline = log.find("\n", starts[-1].start())
        run = "" if newline < 0 else log[newline + 1 :]
    return "\n".join(line for line in run.split("\n") if not _OUR_NOTE.match(line))


def _evidence(text: str, m: re.Match[str]) -> str:
    """The lines the match spans, joined and trimmed (a wrapped message reads as one)."""
    start = text.rfind("\n", 0, m.start()) + 1
    end = text.find("\n", m.end())
    lines = text[start : len(text) if end < 0 else end].split("\n")
    line = " ".join(part.strip() for part in lines)
    return line if len(line) <= 500 else line[:497] + "..."


def _is_warning(text: str, m: re.Match[str]) -> bool:
    start = text.rfind("\n", 0, m.start()) + 1
    end = text.find("\n", m.start())
    line = text[start : len(text) if end < 0 else end]
    return bool(re.search(r"\bWARN(?:ING)?\b|Warning:", line))


def _signal_of(code: int | None) -> int | None:
    """The signal that ended a process: negative codes (Python's) or 128 + N (a shell's)."""
    if code is None:
        return None
    if code < 0:
        return -code
    if 128 < code <= 128 + 64:
        return code - 128
    return None


def _signal_name(sig: int) -> str:
    try:
        return signals.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


# The engines we ended ourselves, when the log names no root cause: what we saw (the
# evidence when the log has no line either) and what to do.
_ENDED_BY_US: dict[Reason, tuple[str, str]] = {
    Reason.START_TIMEOUT: (
        "not ready before the start timeout",
        "the engine did not become ready in time: read its log (`sagellm engine logs`); "
        "a large model may need a longer SAGELLM_START_TIMEOUT_S",
    ),
    Reason.UNRESPONSIVE: (
        "its health checks failed",
        "the engine stopped answering its health checks and was restarted: read its log",
    ),
}


def classify(exit_code: int | None, log_tail: str, *, cause: Reason | None = None) -> Failure:
    """The reason an engine's process ended, from its exit status and its log's tail
    (the whole tail; only its latest run is read, see ``current_run``).

    ``cause``: we ended it ourselves (``START_TIMEOUT``, ``UNRESPONSIVE``); still, a
    message in the log that names the root cause wins."""
    text = current_run(log_tail)
    sig = _signal_of(exit_code)
    for rule in _RULES:
        for m in rule.pattern.finditer(text):
            if rule.errors_only and _is_warning(text, m):
                continue
            return Failure(
                rule.reason.value,
                _evidence(text, m),
                rule.advice(m),
                exit_code,
                sig,
                rule.details(m),
            )
    if exit_code in _NOT_FOUND_CODES and cause is None:
        return Failure(
            Reason.MISSING_RUNTIME.value,
            f"exit code {exit_code} ({_NOT_FOUND_CODES[exit_code]})",
            _runtime_advice(None),
            exit_code,
            None,
        )
    if cause is not None and cause in _ENDED_BY_US:
        without_a_log, advice = _ENDED_BY_US[cause]
        return Failure(cause.value, _last_line(text) or without_a_log, advice, exit_code, sig)
    if sig is not None:
        name = _signal_name(sig)
        advice = (
            "it was killed (SIGKILL): often the kernel's out-of-memory killer (host RAM; "
            "see `dmesg`) or someone's kill -9"
            if sig == signals.SIGKILL
            else f"it was ended by {name} from outside sagellm: find who sent it"
        )
        return Failure(Reason.KILLED_BY_SIGNAL.value, f"killed by {name}", advice, exit_code, sig)
    return Failure(
        Reason.UNKNOWN.value,
        _last_line(text) or (f"exit code {exit_code}" if exit_code is not None else ""),
        "read the engine's log (`sagellm engine logs ID`) for the cause",
        exit_code,
        None,
    )


def _last_line(text: str) -> str:
    for line in reversed(text.split("\n")):
        if line.strip():
            return line.strip()[:500]
    return ""


__all__ = ["MEMORY_REASONS", "NOT_RESTARTABLE", "Failure", "Reason", "classify", "current_run"]
