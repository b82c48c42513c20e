"""The house's floors: no module imports one that stands above it.

Read from the source (every ``import`` and ``from ... import``, at module level or inside
functions), so the rule holds for lazy imports too. Floors, bottom up (docs/layout.md):

    sweep.core  ->  sweep.store  ->  workers | analysis  ->  sweep.prepare  ->  sweep.driver | sweep.local  ->  sweep.cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sweep", "workers", "analysis")
# (module prefix, floor); the longest matching prefix decides. Equal floors may not import
# each other either, except inside one package: workers and analysis stand side by side.
FLOORS = [
    ("sweep.core", 0),
    ("sweep.store", 1),
    ("workers", 2),
    ("analysis", 2),
    ("sweep.prepare", 3),
    ("sweep.driver", 4),
    ("sweep.local", 4),
    ("sweep.cli", 5),
]
# What a floor may not import from outside the project: core is what a study *is* (no
# torch, no storage engines), the store needs no torch, nothing below the driver needs Ray.
FORBIDDEN_THIRD_PARTY = {
    0: {"torch", "torchvision", "ray", "pyarrow", "pandas", "duckdb", "plotly"},
    1: {"torch", "torchvision", "ray", "plotly"},
    2: {"ray"},
    3: {"ray"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _floor(module: str) -> tuple[str, int] | None:
    best = None
    for prefix, floor in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, floor)
    return best


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, however deep."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            # `from sweep.store import schema` imports the submodule sweep.store.schema
            out.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return out


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_has_a_floor() -> None:
    missing = [_module_name(p) for p in _sources() if _floor(_module_name(p)) is None
               and _module_name(p) != "sweep"]
    assert not missing, f"modules on no floor (add them to FLOORS and docs/layout.md): {missing}"


def test_no_import_runs_upward() -> None:
    upward = []
    for path in _sources():
        me = _module_name(path)
        mine = _floor(me)
        if mine is None:
            continue
        for line, target in _imports(path):
            theirs = _floor(target)
            if theirs is None or theirs[0] == mine[0]:
                continue
            if theirs[1] > mine[1] or (theirs[1] == mine[1]):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {me} (floor {mine[1]}) imports "
                              f"{target} (floor {theirs[1]})")
    assert not upward, "imports that run upward or sideways:\n" + "\n".join(sorted(set(upward)))


def test_floors_keep_their_third_party_imports() -> None:
    bad = []
    for path in _sources():
        mine = _floor(_module_name(path))
        if mine is None or mine[1] not in FORBIDDEN_THIRD_PARTY:
            continue
        for line, target in _imports(path):
            if target.split(".")[0] in FORBIDDEN_THIRD_PARTY[mine[1]]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_says_its_floor_and_stays_short(path: Path) -> None:
    text = path.read_text()
    if not text.strip():
        return  # an empty __init__.py
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert "Floor:" in doc, f"{path.relative_to(ROOT)}: the docstring names no floor"
    lines = text.count("\n")
    assert lines <= 400 or "longer than 400 lines" in doc, (
        f"{path.relative_to(ROOT)} has {lines} lines: split it, or say in its docstring why it is "
        "longer than 400 lines")


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The rule is not vacuous: a core module importing the store is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sweep.store.results import ResultStore\n")
    targets = [t for _, t in _imports(bad)]
    assert _floor("sweep.core.grid")[1] < _floor(targets[0])[1]
