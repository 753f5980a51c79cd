"""The models on this host's disk and their facts, read from the files here.

Where models are: the Hugging Face hub cache (``models--org--name/snapshots/<rev>/``,
filed under the repo id), directories holding a ``config.json`` up to ``MAX_DEPTH``
levels under each model root (filed under their path), and the local paths this host's
engines were given. Only ``config.json``, the safetensors index and the safetensors
headers are read (never tensor data), and only again when a file changed: facts are
cached by directory and the names, sizes and mtimes of its files.

The parsing is pure and lives in ``app.core.memory.facts``; this module only reads.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from app.core.memory import (
    MIB,
    ModelFacts,
    hub_repo_id,
    index_weights,
    is_path_like,
    model_facts,
    model_key,
    safetensors_files,
    tensor_bytes_by_dtype,
)
from app.core.memory.facts import SAFETENSORS_INDEX

MAX_DEPTH = 3  # directories below a model root searched for a config.json
MAX_ENTRIES = 20_000  # directory entries one scan of a root looks at, at most
_SENTENCE_TRANSFORMERS = ("modules.json", "config_sentence_transformers.json")
# A model directory's signature: the files whose change changes its facts.
Signature = tuple[tuple[str, int, int], ...]


# ---------------------------------------------------------------------------- files


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


def checkpoint_weights(model_dir: Path) -> tuple[int | None, dict[str, int]]:
    """Bytes of all tensors vLLM loads from ``model_dir`` (None when there are no
    readable safetensors) and their bytes by dtype (from the headers).

    ``model.safetensors.index.json``'s ``metadata.total_size`` is the total when present,
    else the sum of the tensors' ``data_offsets`` in each file's header.
    """
    total: int | None = None
    try:
        index_path = model_dir / SAFETENSORS_INDEX
        if index_path.is_file():
            total, files = index_weights(json.loads(index_path.read_text()))
        else:
            files = safetensors_files(p.name for p in model_dir.iterdir())
    except (OSError, ValueError, AttributeError):
        return None, {}
    by_dtype: dict[str, int] = {}
    try:
        for name in files:
            for dtype, size in tensor_bytes_by_dtype(
                read_safetensors_header(model_dir / name)
            ).items():
                by_dtype[dtype] = by_dtype.get(dtype, 0) + size
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        by_dtype = {}  # unreadable or incomplete download: the config decides
    if total is None:
        total = sum(by_dtype.values()) or None
    return total, by_dtype


def load_config(model_dir: Path) -> dict[str, Any] | None:
    """config.json of a model directory, or None when absent or unreadable."""
    try:
        data = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def measure(key: str, model_dir: Path) -> ModelFacts | None:
    """The facts of the checkpoint in ``model_dir``; None when it holds neither a
    config nor weights."""
    config = load_config(model_dir)
    total, by_dtype = checkpoint_weights(model_dir)
    try:
        names = {p.name: p for p in model_dir.iterdir()}
    except OSError:
        return None
    # What sentence-transformers loads: every top-level safetensors, else torch .bin files.
    files = sorted(n for n in names if n.endswith(".safetensors")) or sorted(
        n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")
    )
    file_bytes = 0
    for name in files:
        try:
            file_bytes += names[name].stat().st_size
        except OSError:
            continue
    if config is None and not total and not file_bytes:
        return None
    return model_facts(
        key,
        str(model_dir),
        config,
        weights_bytes=total,
        weights_bytes_by_dtype=by_dtype,
        file_bytes=file_bytes,
        sentence_transformers=any(n in names for n in _SENTENCE_TRANSFORMERS),
    )


def signature(model_dir: Path) -> Signature | None:
    """Names, sizes and mtimes of the files the facts come from; None: not a directory."""
    out = []
    try:
        with os.scandir(model_dir) as entries:
            for e in entries:
                if e.name.endswith((".json", ".safetensors", ".bin")):
                    try:
                        st = e.stat()
                    except OSError:  # a dangling link (blob being downloaded)
                        continue
                    out.append((e.name, st.st_mtime_ns, st.st_size))
    except OSError:
        return None
    return tuple(sorted(out))


# ---------------------------------------------------------------------------- finding


def snapshot_dir(repo_dir: Path) -> Path | None:
    """The snapshot of a hub cache repo to use: the one ``refs/main`` names, else the
    newest holding a config.json."""
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


def resolve_model_dir(model: str, hub_cache: Path) -> Path | None:
    """The local directory holding ``model``'s files, or None. Never downloads.

    ``model`` is a directory path, or a Hugging Face repo id looked up in ``hub_cache``.
    """
    if not model.strip():
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if is_path_like(model):
        return None  # a path that does not exist; not a repo id
    return snapshot_dir(hub_cache / ("models--" + model.replace("/", "--")))


def hub_models(hub_cache: Path) -> Iterator[tuple[str, Path]]:
    """(repo id, snapshot directory) of each model in a hub cache."""
    try:
        entries = sorted(hub_cache.iterdir())
    except OSError:
        return
    for repo_dir in entries:
        repo = hub_repo_id(repo_dir.name)
        if repo is None:
            continue
        try:
            snap = snapshot_dir(repo_dir)
        except OSError:
            continue
        if snap is not None:
            yield repo, snap


def model_dirs(root: Path, *, skip: Iterable[Path] = (), max_depth: int = MAX_DEPTH) -> list[Path]:
    """Directories holding a config.json at most ``max_depth`` levels under ``root``
    (the root itself included), not descending into one, nor into hidden directories
    or ``skip`` (the hub cache, listed by repo id instead)."""
    skipped = {os.path.realpath(p) for p in skip}
    found: list[Path] = []
    seen: set[str] = set()
    budget = MAX_ENTRIES
    level = [root]
    for depth in range(max_depth + 1):
        below: list[Path] = []
        for d in level:
            real = os.path.realpath(d)
            if real in skipped or real in seen:
                continue
            seen.add(real)
            if (d / "config.json").is_file():
                found.append(d)
                continue
            if depth == max_depth:
                continue
            try:
                with os.scandir(d) as entries:
                    for e in entries:
                        budget -= 1
                        if budget < 0:
                            return found
                        if not e.name.startswith(".") and e.is_dir():
                            below.append(d / e.name)
            except OSError:
                continue
        level = sorted(below)
    return found


class ModelScanner:
    """Finds this host's models and measures them, re-reading a directory's files only
    when its signature changed since the last scan."""

    def __init__(
        self, roots: Sequence[str], hub_cache: Path, *, max_depth: int = MAX_DEPTH
    ) -> None:
        self.roots = [Path(os.path.expanduser(r)) for r in roots]
        self.hub_cache = Path(os.path.expanduser(hub_cache))
        self.max_depth = max_depth
        self.reads = 0  # directories measured (not served from the cache): for tests
        self._cache: dict[tuple[str, str], tuple[Signature, ModelFacts | None]] = {}

    def find(self, engine_models: Iterable[str] = ()) -> dict[str, Path]:
        """key -> directory of every model on this host."""
        found: dict[str, Path] = dict(hub_models(self.hub_cache))
        for root in self.roots:
            for d in model_dirs(root, skip=[self.hub_cache], max_depth=self.max_depth):
                found.setdefault(model_key(os.path.normpath(d)), d)
        for model in engine_models:
            if is_path_like(model):
                path = Path(os.path.expanduser(model))
                if path.is_dir():
                    found.setdefault(model_key(model), path)
        return found

    def scan(self, engine_models: Iterable[str] = ()) -> dict[str, ModelFacts]:
        """The facts of every model on this host, by key (repo id or path)."""
        out: dict[str, ModelFacts] = {}
        cache: dict[tuple[str, str], tuple[Signature, ModelFacts | None]] = {}
        for key, d in sorted(self.find(engine_models).items()):
            sig = signature(d)
            if sig is None:
                continue
            entry = self._cache.get((key, str(d)))
            if entry is None or entry[0] != sig:
                entry = (sig, measure(key, d))
                self.reads += 1
            cache[(key, str(d))] = entry
            if entry[1] is not None:
                out[key] = entry[1]
        self._cache = cache  # models gone from disk are forgotten
        return out
