"""The house's floors: no module imports one that stands above it, and no import circles.

Read from the source (every ``import`` and ``from ... import``, at module level or inside
functions, relative ones resolved), so the rules hold for lazy imports too. Floors, bottom
up (docs/layout.md):

    sweep.core  ->  sweep.store  ->  workers | analysis  ->  sweep.prepare  ->  sweep.driver | sweep.local  ->  sweep.cli

The rules are functions (``upward_imports``, ``import_cycles``) run on the real tree and, in
self-tests, on planted trees where they must fail: a check that cannot fail checks nothing.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
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
    ("sweep.slurm", 4),
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
def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str, floors: Iterable[tuple[str, int]] = FLOORS) -> tuple[str, int] | None:
    best = None
    for prefix, floor in floors:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, floor)
    return best


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, however deep; relative imports
    resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path, root)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                module = node.module
            else:
                continue
            out.append((node.lineno, module))
            # `from sweep.store import schema` imports the submodule sweep.store.schema
            out.extend((node.lineno, f"{module}.{a.name}") for a in node.names)
    return out


def sources(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> list[Path]:
    return sorted(p for pkg in packages for p in (root / pkg).rglob("*.py"))


def upward_imports(root: Path = ROOT, packages: Iterable[str] = PACKAGES,
                   floors: Iterable[tuple[str, int]] = FLOORS) -> list[str]:
    """Every import that runs upward or sideways (to another package on the same floor),
    as 'path:line: module (floor n) imports target (floor m)'."""
    floors = list(floors)
    bad = []
    for path in sources(root, packages):
        me = module_name(path, root)
        mine = floor_of(me, floors)
        if mine is None:
            continue
        for line, target in imports_of(path, root):
            theirs = floor_of(target, floors)
            if theirs is None or theirs[0] == mine[0]:
                continue
            if theirs[1] >= mine[1]:
                bad.append(f"{path.relative_to(root)}:{line}: {me} (floor {mine[1]}) imports "
                           f"{target} (floor {theirs[1]})")
    return sorted(set(bad))


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports (lazy imports too)."""
    modules = {module_name(p, root): p for p in sources(root, packages)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for me, path in modules.items():
        for _, target in imports_of(path, root):
            while target and target not in modules:  # `from a.b import f`: the module a.b
                target = target.rpartition(".")[0]
            if target and target != me:
                graph[me].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module: each is an import circle
    (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(frozenset(component))
    return cycles


def _plant(root: Path, files: dict[str, str]) -> Path:
    """A source tree of the given files (relative path -> text), with package __init__s."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in [path.parent, *path.parent.parents]:
            if folder == root or root not in folder.parents:
                break
            (folder / "__init__.py").touch()
        path.write_text(text)
    return root


# -- the rules on the real tree ---------------------------------------------------------

def test_every_module_has_a_floor() -> None:
    missing = [module_name(p) for p in sources() if floor_of(module_name(p)) is None
               and module_name(p) != "sweep"]
    assert not missing, f"modules on no floor (add them to FLOORS and docs/layout.md): {missing}"


def test_no_import_runs_upward() -> None:
    upward = upward_imports()
    assert not upward, "imports that run upward or sideways:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", ["sweep.core", "sweep.store", "workers", "analysis", "sweep"])
def test_no_import_circles_inside_a_package(package: str) -> None:
    """Inside one floor's package imports may run either way, but never in a circle (a
    circle hidden by lazy imports is still one: whichever module loads first decides)."""
    inside = [c for c in import_cycles(import_graph())
              if all(m == package or m.startswith(package + ".") for m in c)]
    assert not inside, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in inside)


def test_floors_keep_their_third_party_imports() -> None:
    bad = []
    for path in sources():
        mine = floor_of(module_name(path))
        if mine is None or mine[1] not in FORBIDDEN_THIRD_PARTY:
            continue
        for line, target in imports_of(path):
            if target.split(".")[0] in FORBIDDEN_THIRD_PARTY[mine[1]]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
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


# -- self-tests: the rules fail on planted trees ---------------------------------------------

CLEAN = {
    "sweep/core/grid.py": "import os\nfrom sweep.core import spec\n",
    "sweep/core/spec.py": "",
    "sweep/store/results.py": "from sweep.core.grid import load_grid\n",
    "workers/run_pack.py": "from sweep.store import results\nfrom . import models\n",
    "workers/models.py": "import torch\n",
    "analysis/load.py": "from sweep.store.results import ResultStore\n",
    "sweep/cli.py": "def run():\n    from sweep.driver import run_sweep\n    import workers.run_pack\n",
    "sweep/driver.py": "",
}


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    root = _plant(tmp_path, CLEAN)
    assert upward_imports(root) == []
    assert import_cycles(import_graph(root)) == []


@pytest.mark.parametrize("rel, text, found", [
    pytest.param("sweep/core/grid.py", "def f():\n    from sweep.store.results import ResultStore\n",
                 "sweep/core/grid.py:2: sweep.core.grid (floor 0) imports sweep.store.results (floor 1)",
                 id="lazy-upward"),
    pytest.param("sweep/store/results.py", "import workers.run_pack\n",
                 "sweep.store.results (floor 1) imports workers.run_pack (floor 2)", id="module-level-upward"),
    pytest.param("workers/run_pack.py", "from analysis import load\n",
                 "workers.run_pack (floor 2) imports analysis (floor 2)", id="sideways"),
    pytest.param("analysis/load.py", "from sweep import cli\n",
                 "analysis.load (floor 2) imports sweep.cli (floor 5)", id="from-package-import-module"),
    pytest.param("sweep/driver.py", "from sweep.cli import main\n",
                 "sweep.driver (floor 4) imports sweep.cli (floor 5)", id="runner-imports-the-cli"),
])
def test_a_planted_upward_import_is_found(tmp_path: Path, rel: str, text: str, found: str) -> None:
    root = _plant(tmp_path, {**CLEAN, rel: text})
    assert any(found in line for line in upward_imports(root)), upward_imports(root)


def test_a_planted_circle_is_found_and_only_it(tmp_path: Path) -> None:
    root = _plant(tmp_path, {
        **CLEAN,
        "workers/models.py": "def build():\n    from workers.fused_lenet import FusedLeNet5\n",
        "workers/fused_lenet.py": "from workers import models\n",  # `from package import module`
        "workers/engine.py": "from .run_pack import run_pack\n",  # relative, one way only: no circle
        "sweep/core/a.py": "from sweep.core.b import x\n",
        "sweep/core/b.py": "def x():\n    from . import c\n",
        "sweep/core/c.py": "import sweep.core.a\n",
    })
    assert upward_imports(root) == []  # circles inside one floor break no floor rule
    assert sorted(import_cycles(import_graph(root)), key=sorted) == [
        frozenset({"sweep.core.a", "sweep.core.b", "sweep.core.c"}),
        frozenset({"workers.fused_lenet", "workers.models"}),
    ]
