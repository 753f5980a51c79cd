"""The layout rules of ARCHITECTURE.md: who may import whom, no two modules importing
each other, and no module past 600 lines (the engine servers excepted).

The import rules are import-linter contracts in ``pyproject.toml`` (``[tool.importlinter]``);
``lint-imports`` checks them on the real tree, and a copy with one forbidden import
added proves the check can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
MAX_LINES = 600
SIZE_EXEMPT = ("workers/servers/",)  # the engine servers: each is one program


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the analysed packages are the ones in ``tree``, not the
    # editable install's (which points at this checkout).
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [LINT_IMPORTS, str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_hold() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_forbidden_import_breaks_the_contracts(tmp_path: Path) -> None:
    for name in ("app", "workers"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path).returncode == 0  # the copy is analysed, and is clean

    errors = tmp_path / "app" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport workers.tasks  # noqa: E402,F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "app.core is not allowed to import workers" in result.stdout


def _mutual_imports(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    pairs = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if module < imported and module in graph.find_modules_directly_imported_by(imported):
                pairs.append((module, imported))
    return pairs


def test_no_two_modules_import_each_other() -> None:
    graph = grimp.build_graph("app", "workers", cache_dir=None)
    assert _mutual_imports(graph) == []


def test_the_mutual_import_check_can_fail() -> None:
    graph = grimp.build_graph("app", "workers", cache_dir=None)
    graph.add_import(importer="app.core.errors", imported="app.core.models")
    graph.add_import(importer="app.core.models", imported="app.core.errors")
    assert ("app.core.errors", "app.core.models") in _mutual_imports(graph)


def _python_files() -> list[Path]:
    return sorted(
        p
        for top in ("app", "workers")
        for p in (ROOT / top).rglob("*.py")
        if not str(p.relative_to(ROOT)).startswith(SIZE_EXEMPT)
    )


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_past_600_lines(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{rel} has {lines} lines (at most {MAX_LINES})"
