"""Engine manifests: a copy of each engine's record on its host's own disk.

Written when the worker spawns an engine, removed when it is finally stopped or
failed. Redis may be lost (ARCHITECTURE invariant 6); the process survives, and its
manifest tells rediscovery what the engine is (spec, GPUs, port, memory), so the
registry and ledger can be rebuilt from the processes actually running.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from app.core.models import EngineRecord


class Manifests:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, engine_id: str) -> Path:
        return self.dir / f"{engine_id}.json"

    def write(self, record: EngineRecord) -> None:
        """Atomically (write + rename) store ``record``."""
        tmp = self._path(record.id).with_suffix(".tmp")
        tmp.write_text(json.dumps(record.to_dict()))
        os.replace(tmp, self._path(record.id))

    def read(self, engine_id: str) -> EngineRecord | None:
        try:
            return EngineRecord.from_dict(json.loads(self._path(engine_id).read_text()))
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def remove(self, engine_id: str) -> None:
        self._path(engine_id).unlink(missing_ok=True)

    def ids(self) -> set[str]:
        return {p.stem for p in self.dir.glob("*.json")}
