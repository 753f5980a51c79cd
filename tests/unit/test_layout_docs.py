"""The maps match the tree: ARCHITECTURE.md's layout names every package and module of
``app`` and ``workers`` (and nothing that is gone), and the README's layout names every
package.

A module is named by its file name (``model_facts.py``), its stem (``model_facts``) or
its stem in words (``model facts``), inside the block of its package.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOPS = ("app", "workers")


def _section(path: Path, start: str, end: str) -> str:
    text = path.read_text()
    assert start in text, f"{path.name} has no {start!r} section"
    return text.split(start, 1)[1].split(end, 1)[0]


def _architecture_layout() -> str:
    return _section(ROOT / "ARCHITECTURE.md", "## Layout and its rules", "\n## ")


def _readme_layout() -> str:
    return _section(ROOT / "README.md", "\n## Layout\n", "\n## ")


def _packages() -> list[Path]:
    return sorted(
        p.parent.relative_to(ROOT)
        for top in TOPS
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    )


def _modules(package: Path) -> list[str]:
    return sorted(
        p.stem for p in (ROOT / package).glob("*.py") if p.stem not in ("__init__", "__main__")
    )


def _names(stem: str) -> re.Pattern[str]:
    words = re.escape(stem.replace("_", " "))
    return re.compile(rf"(?<![\w/]){re.escape(stem)}(?:\.py)?\b|\b{words}\b", re.IGNORECASE)


def _block_of(layout: str, package: Path) -> str:
    """The lines of the layout under ``package``'s heading (``core/`` within ``app/``,
    ``agent/`` within ``workers/``), up to the next line indented as much or less."""
    lines = layout.splitlines()
    leaf = package.name + "/"
    if len(package.parts) == 1:
        return layout
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith(leaf) or stripped.startswith(str(package) + "/"):
            indent = len(line) - len(stripped)
            block = [line]
            for nxt in lines[i + 1 :]:
                body = nxt.lstrip()
                if body and len(nxt) - len(body) <= indent and not body.startswith(("(", "|")):
                    break
                block.append(nxt)
            return "\n".join(block)
    return ""


def test_architecture_names_every_package_and_module() -> None:
    layout = _architecture_layout()
    missing = []
    for package in _packages():
        block = _block_of(layout, package)
        if not block:
            missing.append(f"{package}/ (package)")
            continue
        missing += [f"{package}/{m}.py" for m in _modules(package) if not _names(m).search(block)]
    assert missing == [], "ARCHITECTURE.md's layout does not name: " + ", ".join(missing)


def test_architecture_names_no_module_that_is_gone() -> None:
    layout = _architecture_layout()
    stems = {p.stem for top in (*TOPS, "tests", "bench") for p in (ROOT / top).rglob("*.py")}
    named = set(re.findall(r"\b(\w+)\.py\b", layout))
    assert named - stems == set(), f"ARCHITECTURE.md names files that do not exist: {named - stems}"


def test_readme_names_every_package() -> None:
    layout = _readme_layout()
    missing = [
        str(p)
        for p in _packages()
        if not re.search(rf"(?<![\w/]){re.escape(p.name)}/", layout) and str(p) not in layout
    ]
    assert missing == [], "the README's layout does not name: " + ", ".join(missing)


def test_a_module_missing_from_the_map_is_found() -> None:
    block = _block_of("app/\n  core/  spec.py, models\n  state/  registry\n", Path("app/core"))
    assert _names("models").search(block)
    assert not _names("registry").search(block)
    assert not _names("gpus").search(block)
