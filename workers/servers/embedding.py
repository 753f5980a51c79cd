"""OpenAI-compatible embedding server on sentence-transformers.

Run: ``python -m workers.servers.embedding --model PATH_OR_ID --host H --port P
[--served-model-name NAME] [--device auto|cpu|cuda]``.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/embeddings``. Inputs are
strings only (token-id inputs get a 400). ``encoding_format`` is ``float`` or
``base64`` (little-endian float32, what the openai SDK asks for by default).
``dimensions`` is accepted only when it equals the model's own size: cutting vectors of
a model not trained for it (Matryoshka) silently degrades them, so a mismatch is a 400
instead. Vectors are whatever the model's pipeline produces (normalised when the model
ends in a Normalize module, as all-MiniLM-L6-v2 does).
"""

from __future__ import annotations

import base64
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify

from workers.servers.common import (
    ModelIdentity,
    ServerArgs,
    bad_request,
    create_app,
    read_json_object,
    run_server,
)

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # OpenAI's own limit on inputs per request
ENCODING_FORMATS = ("float", "base64")
# How long SIGTERM waits for a running batch; under the worker's grace before SIGKILL.
SHUTDOWN_GRACE_S = 2.0


class EmbeddingEngine:
    """One sentence-transformers model; embeds lists of strings and counts their tokens."""

    def __init__(self, model: str, device: str) -> None:
        from sentence_transformers import SentenceTransformer  # slow import: load time only

        self._model = SentenceTransformer(model, device=device)
        # sentence-transformers 5+ renamed the method; keep working with 3.x/4.x.
        get_dim = getattr(self._model, "get_embedding_dimension", None)
        if get_dim is None:
            get_dim = self._model.get_sentence_embedding_dimension
        dimension = get_dim()
        if dimension is None:
            raise SystemExit(f"{model}: the model does not report its embedding size")
        self.dimension = int(dimension)
        # One request at a time: concurrent torch calls on a CPU only fight over the same
        # cores, and the tokenizer's truncation state is shared between our token count
        # and encode().
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Embeddings of ``texts`` (one row each) and the tokens the model consumed."""
        with self._lock:
            vectors = self._model.encode(
                list(texts), batch_size=32, convert_to_numpy=True, show_progress_bar=False
            )
            return np.asarray(vectors, dtype=np.float32), self._count_tokens(texts)

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the running request, then refuse new ones.

        Returns whether the model is idle (the lock is then kept: nothing starts again).
        """
        return self._lock.acquire(timeout=timeout_s)

    def _count_tokens(self, texts: Sequence[str]) -> int:
        # The model's own tokenizer, truncated as encode() truncates, special tokens
        # included: the tokens that were really run through the model.
        encoded = self._model.tokenizer(
            list(texts), truncation=True, max_length=self._model.max_seq_length
        )
        return sum(len(ids) for ids in encoded["input_ids"])


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated ``POST /v1/embeddings`` body."""

    texts: list[str]
    encoding_format: str


def _is_token_ids(value: list[Any]) -> bool:
    def ints(items: list[Any]) -> bool:
        return all(isinstance(i, int) and not isinstance(i, bool) for i in items)

    return ints(value) or all(isinstance(v, list) and ints(v) for v in value)


def parse_embedding_request(body: dict[str, Any], dimension: int) -> EmbeddingRequest:
    """Validate an embeddings body against a model of ``dimension``; 400 naming the field."""
    if "input" not in body or body["input"] is None:
        raise bad_request("'input' is required: a string or a list of strings.", "input")
    raw = body["input"]
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list):
        if not raw:
            raise bad_request("'input' must not be an empty list.", "input")
        if all(isinstance(item, str) for item in raw):
            texts = list(raw)
        elif _is_token_ids(raw):
            raise bad_request("'input' holds token ids; this server accepts only strings.", "input")
        else:
            raise bad_request("'input' must be a string or a list of strings.", "input")
    else:
        raise bad_request("'input' must be a string or a list of strings.", "input")
    if len(texts) > MAX_INPUTS:
        raise bad_request(
            f"'input' has {len(texts)} items; at most {MAX_INPUTS} per request.", "input"
        )

    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise bad_request(
            f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}, "
            f"got {encoding_format!r}.",
            "encoding_format",
        )

    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions != dimension
    ):
        raise bad_request(
            f"'dimensions' must be {dimension} (this model's embedding size) or omitted, "
            f"got {dimensions!r}; truncation is not supported.",
            "dimensions",
        )
    return EmbeddingRequest(texts=texts, encoding_format=encoding_format)


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One embedding as OpenAI sends it: a float list, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def create_embedding_app(engine: EmbeddingEngine, identity: ModelIdentity) -> Flask:
    """The embedding server's Flask app around a loaded ``engine``."""
    app = create_app(__name__, identity)

    @app.post("/v1/embeddings")
    def embeddings() -> Response:
        body = read_json_object()
        identity.check_requested(body)
        req = parse_embedding_request(body, engine.dimension)
        vectors, tokens = engine.embed(req.texts)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return jsonify(
            {
                "object": "list",
                "data": data,
                "model": identity.served_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return app


def build(args: ServerArgs) -> tuple[Flask, Callable[[], bool] | None]:
    """Load the model named by ``args``; return the app and its shutdown hook."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars only clutter the engine log file
    engine = EmbeddingEngine(args.model, args.device)
    identity = ModelIdentity(
        served_name=args.served_model_name,
        model=args.model,
        card_extra={"embedding_dimension": engine.dimension},
    )
    return create_embedding_app(engine, identity), lambda: engine.drain(SHUTDOWN_GRACE_S)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the embedding server; returns the exit status."""
    return run_server("OpenAI-compatible sentence-transformers embedding server", build, argv)


if __name__ == "__main__":
    sys.exit(main())
