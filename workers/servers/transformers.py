"""OpenAI-compatible chat/completions server on Hugging Face transformers (CPU, small models).

Run: ``python -m workers.servers.transformers --model PATH_OR_ID --host H --port P
[--served-model-name NAME] [--device auto|cpu|cuda]``.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions``, streaming (SSE) or not. One generation runs at a time per
process (a lock); others wait their turn. Generation runs on a background thread
feeding a ``TextIteratorStreamer``; the HTTP response yields text as it arrives, and a
stopping criterion ends generation as soon as the client goes away or the server stops.

Supported: ``max_tokens``/``max_completion_tokens`` (default 128, clamped to the
context when not given; a 400 when given and prompt + max_tokens exceeds it),
``temperature`` (0 = greedy, default 1), ``top_p``, ``seed``, ``stop`` (up to 4
strings, cut from the output), ``stream`` and ``stream_options.include_usage``.
Refused with a 400: ``n`` other than 1, ``logprobs``, ``tools``, ``echo``, ``suffix``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import torch
from flask import Flask, Response, jsonify
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from workers.servers.common import (
    ModelIdentity,
    ServerArgs,
    bad_request,
    create_app,
    optional_bool,
    optional_float,
    optional_int,
    read_json_object,
    run_server,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 128
DEFAULT_CONTEXT = 2048  # when the config names no maximum position count
MAX_STOP_STRINGS = 4  # OpenAI's limit
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# How long SIGTERM waits for the running generation to notice it must stop.
SHUTDOWN_GRACE_S = 2.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- request parsing ---------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings taken from a request."""

    max_tokens: int | None  # None: not given, use the default clamped to the context
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


def _refuse_unsupported(body: Mapping[str, Any], names: Sequence[str]) -> None:
    for name in names:
        value = body.get(name)
        if value not in (None, False, [], 0, ""):
            raise bad_request(f"'{name}' is not supported by this server.", name)


def parse_sampling(body: Mapping[str, Any]) -> SamplingParams:
    """Sampling fields shared by chat and completions; 400 naming the bad field."""
    n = optional_int(body, "n", 1, minimum=1)
    if n != 1:
        raise bad_request(f"'n' must be 1 (one choice per request), got {n}.", "n")
    _refuse_unsupported(body, ("logprobs", "top_logprobs", "tools", "echo", "suffix"))
    best_of = optional_int(body, "best_of", 1, minimum=1)
    if best_of != 1:
        raise bad_request(f"'best_of' must be 1, got {best_of}.", "best_of")

    max_tokens = optional_int(body, "max_completion_tokens", None, minimum=1)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", None, minimum=1)

    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (stop_raw,)
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        if len(stop_raw) > MAX_STOP_STRINGS:
            raise bad_request(f"'stop' takes at most {MAX_STOP_STRINGS} strings.", "stop")
        stop = tuple(stop_raw)
    else:
        raise bad_request("'stop' must be a string or a list of strings.", "stop")

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=optional_float(body, "temperature", 1.0, minimum=0.0, maximum=2.0),
        top_p=optional_float(body, "top_p", 1.0, minimum=0.0, maximum=1.0, minimum_exclusive=True),
        seed=optional_int(body, "seed", None, minimum=-(2**63), maximum=2**64 - 1),  # torch's range
        stop=tuple(s for s in stop if s),
    )


def parse_stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)`` from ``stream`` and ``stream_options``."""
    stream = optional_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options")
    return stream, optional_bool(options, "include_usage", False)


def _message_text(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise bad_request(f"'{param}': only text parts are supported.", param)
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"'{param}': a text part needs a string 'text'.", param)
            parts.append(text)
        return "".join(parts)
    raise bad_request(f"'{param}' must be a string or a list of text parts.", param)


def parse_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """``messages`` as plain ``{role, content}`` dicts; 400 naming the bad entry."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required: a non-empty list of messages.", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"'messages[{i}]' must be an object.", f"messages[{i}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(
                f"'messages[{i}].role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}.",
                f"messages[{i}].role",
            )
        if "content" not in message and role != "assistant":
            raise bad_request(f"'messages[{i}].content' is required.", f"messages[{i}].content")
        parsed.append({"role": role, "content": _message_text(message.get("content"), i)})
    return parsed


def parse_prompt(body: Mapping[str, Any]) -> str:
    """``prompt`` of a completions request: one string (no batches, no token ids)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' is required and must be a single string.", "prompt")
    return prompt


# --- generation ----------------------------------------------------------------------------


class StopStringMatcher:
    """Cuts generated text at the first stop string, even when one spans several pieces.

    Text that could be the start of a stop string is held back until the next piece
    shows whether it is one, so no part of a stop string is ever emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return what may be emitted now."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._pending + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buffer[: min(hits)]
        held = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buffer)), held, -1):
                if buffer.endswith(stop[:k]):
                    held = k
                    break
        self._pending = buffer[len(buffer) - held :]
        return buffer[: len(buffer) - held]

    def flush(self) -> str:
        """Text held back when generation ended without a stop string."""
        rest, self._pending = ("" if self.stopped else self._pending), ""
        return rest


class _GenerationControl(StoppingCriteria):
    """Counts generated tokens and stops generate() when asked to (client gone, shutdown)."""

    def __init__(self, prompt_tokens: int, closing: threading.Event) -> None:
        self.prompt_tokens = prompt_tokens
        self.cancel = threading.Event()
        self._closing = closing
        self.generated = 0
        self.last_token: int | None = None

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: Any
    ) -> torch.BoolTensor:
        # Called once after every new token, with the whole sequence so far.
        self.generated = int(input_ids.shape[-1]) - self.prompt_tokens
        self.last_token = int(input_ids[0, -1])
        stop = self.cancel.is_set() or self._closing.is_set()
        return torch.full(  # type: ignore[return-value]
            (input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device
        )


@dataclass
class Generation:
    """One generate() call: iterate it for text pieces; the totals are set when it ends."""

    engine: CausalLMEngine
    input_ids: torch.Tensor
    max_new_tokens: int
    params: SamplingParams
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: BaseException | None = None  # set by the generation thread when generate() fails

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt, as the model saw them."""
        return int(self.input_ids.shape[-1])

    def __iter__(self) -> Generator[str, None, None]:
        return self.engine.run(self)


class CausalLMEngine:
    """A causal LM and its tokenizer; runs one generation at a time."""

    def __init__(self, model: str, device: str) -> None:
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        # float32 on CPU: half precisions are slow or unsupported there; on a GPU the
        # checkpoint's own dtype.
        dtype: Any = torch.float32 if device == "cpu" else "auto"
        # Any: transformers' annotations of the auto classes confuse mypy (wrong self types).
        auto_model: Any = AutoModelForCausalLM
        self.model: Any = auto_model.from_pretrained(model, dtype=dtype)
        self.model.to(device)
        self.model.eval()
        config = self.model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or DEFAULT_CONTEXT
        )
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_token_ids = {i for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None}
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = min(self.eos_token_ids) if self.eos_token_ids else 0
        self._lock = threading.Lock()
        self._closing = threading.Event()

    # -- prompts --

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """Token ids of a chat: the tokenizer's chat template, else ``role: content`` lines."""
        if getattr(self.tokenizer, "chat_template", None):
            import jinja2

            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except jinja2.TemplateError as exc:  # e.g. a template refusing a role order
                message = f"'messages' rejected by the chat template: {exc}"
                raise bad_request(message, "messages") from exc
            # The template already writes BOS and friends.
            return self._encode(str(text), add_special_tokens=False)
        lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self._encode(lines + "assistant:", add_special_tokens=True)

    def completion_prompt_ids(self, prompt: str) -> torch.Tensor:
        """Token ids of a completions prompt, with the tokenizer's special tokens."""
        return self._encode(prompt, add_special_tokens=True)

    def _encode(self, text: str, add_special_tokens: bool) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)

    # -- generation --

    def start(
        self, input_ids: torch.Tensor, params: SamplingParams, prompt_param: str
    ) -> Generation:
        """Check the request fits the context and return a generation to iterate.

        A 400 when the prompt (the request field ``prompt_param``) leaves no room, or an
        explicit ``max_tokens`` overflows the context.
        """
        prompt_tokens = int(input_ids.shape[-1])
        room = self.context_length - prompt_tokens
        if room <= 0:
            raise bad_request(
                f"The prompt is {prompt_tokens} tokens; this model's context is "
                f"{self.context_length} tokens.",
                prompt_param,
            )
        if params.max_tokens is None:
            max_new = min(DEFAULT_MAX_TOKENS, room)
        elif params.max_tokens > room:
            raise bad_request(
                f"'max_tokens' is {params.max_tokens} but the prompt is {prompt_tokens} tokens "
                f"and the context {self.context_length}: at most {room}.",
                "max_tokens",
            )
        else:
            max_new = params.max_tokens
        return Generation(engine=self, input_ids=input_ids, max_new_tokens=max_new, params=params)

    def run(self, gen: Generation) -> Generator[str, None, None]:
        """Run ``gen`` and yield its text as it is generated (via ``iter(gen)``).

        The lock is taken on the first ``next()`` and released in ``finally``, which also
        runs when the caller closes the generator early (the client went away): the
        generation is then cancelled at its next token.
        """
        with self._lock:
            control = _GenerationControl(gen.prompt_tokens, self._closing)
            streamer = TextIteratorStreamer(
                self.tokenizer, skip_prompt=True, skip_special_tokens=True
            )
            worker = threading.Thread(
                target=self._generate,
                args=(gen, control, streamer),
                name="generate",
                daemon=True,
            )
            matcher = StopStringMatcher(gen.params.stop)
            worker.start()
            try:
                for piece in streamer:
                    text = matcher.feed(piece)
                    if text:
                        yield text
                    if matcher.stopped:
                        control.cancel.set()
                        break
                rest = matcher.flush()
                if rest:
                    yield rest
            finally:
                control.cancel.set()  # no-op when generation already ended
                worker.join()
                # Counted even when cut short: these tokens were computed.
                gen.completion_tokens = control.generated
                hit_eos = control.last_token in self.eos_token_ids
                ran_out = control.generated >= gen.max_new_tokens and not hit_eos
                gen.finish_reason = "length" if ran_out and not matcher.stopped else "stop"
            if gen.error is not None:
                raise gen.error

    def _generate(
        self, gen: Generation, control: _GenerationControl, streamer: TextIteratorStreamer
    ) -> None:
        params = gen.params
        sampling: dict[str, Any]
        if params.temperature == 0:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        else:
            # top_k=0 switches off transformers' default top-k of 50: OpenAI has no top-k.
            sampling = {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": 0,
            }
        try:
            if params.seed is not None:
                torch.manual_seed(params.seed)  # global RNG is fine: one generation at a time
            input_ids = gen.input_ids.to(self.device)
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=gen.max_new_tokens,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([control]),
                pad_token_id=self.pad_token_id,
                **sampling,
            )
        except BaseException as exc:
            log.exception("generation failed")
            gen.error = exc
            streamer.end()  # unblock the reader, which would otherwise wait forever

    def shutdown(self, timeout_s: float) -> bool:
        """Stop the running generation and refuse new ones; True when it ended in time."""
        self._closing.set()
        return self._lock.acquire(timeout=timeout_s)


# --- responses -------------------------------------------------------------------------------


def _usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def _sse(payload: Mapping[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _stream_response(events: Iterator[str]) -> Response:
    return Response(events, content_type="text/event-stream", headers=SSE_HEADERS)


def _stream_error(exc: BaseException) -> str:
    # Headers are gone by now; OpenAI clients read an `error` object in the stream.
    message = f"generation failed: {type(exc).__name__}: {exc}"
    return _sse(
        {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    )


def chat_events(gen: Generation, served_name: str, include_usage: bool) -> Iterator[str]:
    """SSE events of a streamed chat completion, in OpenAI's chat.completion.chunk shape."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": served_name,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice]})

    yield chunk({"role": "assistant"})
    # closing(): when the client goes away we are closed at a yield, and closing the
    # generation right then cancels it instead of waiting for garbage collection.
    with closing(iter(gen)) as pieces:
        try:
            for text in pieces:
                yield chunk({"content": text})
        except Exception as exc:
            yield _stream_error(exc)
            return
    yield chunk({}, gen.finish_reason)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(gen)})
    yield _sse("[DONE]")


def completion_events(gen: Generation, served_name: str, include_usage: bool) -> Iterator[str]:
    """SSE events of a streamed text completion, in OpenAI's text_completion shape."""
    base = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": served_name,
    }

    def chunk(text: str, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice]})

    with closing(iter(gen)) as pieces:
        try:
            for text in pieces:
                yield chunk(text)
        except Exception as exc:
            yield _stream_error(exc)
            return
    yield chunk("", gen.finish_reason)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(gen)})
    yield _sse("[DONE]")


def create_transformers_app(engine: CausalLMEngine, identity: ModelIdentity) -> Flask:
    """The transformers server's Flask app around a loaded ``engine``."""
    app = create_app(__name__, identity)

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        body = read_json_object()
        identity.check_requested(body)
        messages = parse_messages(body)
        params = parse_sampling(body)
        stream, include_usage = parse_stream(body)
        gen = engine.start(engine.chat_prompt_ids(messages), params, "messages")
        if stream:
            return _stream_response(chat_events(gen, identity.served_name, include_usage))
        text = "".join(gen)
        return jsonify(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": identity.served_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": gen.finish_reason,
                    }
                ],
                "usage": _usage(gen),
            }
        )

    @app.post("/v1/completions")
    def completions() -> Response:
        body = read_json_object()
        identity.check_requested(body)
        prompt = parse_prompt(body)
        params = parse_sampling(body)
        stream, include_usage = parse_stream(body)
        gen = engine.start(engine.completion_prompt_ids(prompt), params, "prompt")
        if stream:
            return _stream_response(completion_events(gen, identity.served_name, include_usage))
        text = "".join(gen)
        return jsonify(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": identity.served_name,
                "choices": [
                    {"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}
                ],
                "usage": _usage(gen),
            }
        )

    return app


def build(args: ServerArgs) -> tuple[Flask, Callable[[], bool] | None]:
    """Load the model named by ``args``; return the app and its shutdown hook."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars only clutter the engine log file
    engine = CausalLMEngine(args.model, args.device)
    identity = ModelIdentity(
        served_name=args.served_model_name,
        model=args.model,
        card_extra={"max_model_len": engine.context_length},
    )
    return create_transformers_app(engine, identity), lambda: engine.shutdown(SHUTDOWN_GRACE_S)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the transformers server; returns the exit status."""
    return run_server("OpenAI-compatible Hugging Face transformers server", build, argv)


if __name__ == "__main__":
    sys.exit(main())
