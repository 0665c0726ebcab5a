"""The layer boundaries: attack <- scoring <- report <- platform / cli (each imports only downwards),
no import circle between any two modules of tldr_core (lazy imports inside functions count too), and
the attack and scoring layers import without the platform's frameworks (ray, mlflow, optuna,
psycopg2), so they install and run with torch alone."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tldr_core

PACKAGE = Path(list(tldr_core.__path__)[0])
PLATFORM_ONLY = ("ray", "mlflow", "optuna", "psycopg2")
#: layer -> the layers it must not import (they sit above it)
FORBIDDEN = {
    "attack": ("scoring", "report", "platform", "cli"),
    "scoring": ("report", "platform", "cli"),
    "report": ("platform", "cli"),
}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of `package`, at any depth (lazy
    imports inside functions included); relative imports are resolved against `package`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def _modules(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package folder `package` (a package is its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def violations(layer: str, package: Path = PACKAGE) -> list[str]:
    """Imports of `layer`'s modules that go up a layer, or reach a platform framework."""
    out = []
    for path in sorted((package / layer).rglob("*.py")):
        pkg = ".".join(path.relative_to(package.parent).parts[:-1])
        for line, name in imported_modules(path.read_text(), pkg):
            parts = name.split(".")
            where = f"{path.relative_to(package.parent)}:{line} imports {name}"
            if parts[0] == package.name and len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                out.append(where)
            if parts[0] in PLATFORM_ONLY:
                out.append(where)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, at any depth. `from pkg import x` is an
    edge to the module pkg.x when there is one, else to pkg; the package's own __init__ that Python
    runs first is not an edge (ours hold docstrings, not imports)."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                (_, base), = imported_modules(ast.unparse(node), pkg)
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        edges.add(f"{base}.{alias.name}")
                    elif base in modules:
                        edges.add(base)
        graph[name] = edges - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle (a -> ... -> a) per group of modules that import each other (Tarjan's strongly
    connected components with more than one module), each starting at its smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while not group or group_top != v:
                group_top = stack.pop()
                group.add(group_top)
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_circle_through(graph, g) for g in groups)


def _circle_through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's smallest module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no circle through {start}")  # cannot happen for a strongly connected group


def test_import_parser_sees_relative_and_lazy_imports():
    src = "from ..scoring import metrics\n\ndef f():\n    import mlflow.pyfunc\n    from .models import X\n"
    found = sorted(imported_modules(src, "tldr_core.attack"))
    assert found == [(1, "tldr_core.scoring"), (4, "mlflow.pyfunc"), (5, "tldr_core.attack.models")]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    assert violations(layer) == []


def test_no_import_circles():
    """No two modules import each other, directly or around a longer loop, lazy imports included: a
    circle means neither module can be read (or imported) without the other."""
    graph = import_graph()
    assert len(graph) >= 60 and graph["tldr_core.platform.search.driver"], "the import graph came out empty"
    assert [" -> ".join(c) for c in circles(graph)] == []


def _scratch_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "scratch" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "scratch"


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    """On a scratch package: an attack module importing the report layer (lazily), and three platform
    modules importing each other around a loop (one lazily, one by a relative import), are both found;
    the same package without them passes."""
    clean = {"__init__.py": "", "attack/__init__.py": "", "report/__init__.py": "", "platform/__init__.py": "",
             "attack/a.py": "import torch\n", "report/r.py": "R = 1\n",
             "platform/x.py": "from scratch.platform import y\n",
             "platform/y.py": "from scratch.platform.z import f\n",
             "platform/z.py": "def f():\n    return 1\n"}
    ok = _scratch_package(tmp_path / "ok", clean)
    assert violations("attack", ok) == [] and circles(import_graph(ok)) == []
    assert import_graph(ok)["scratch.platform.x"] == {"scratch.platform.y"}

    bad = _scratch_package(tmp_path / "bad", {
        **clean,
        "attack/a.py": "import torch\n\ndef f():\n    from scratch.report import r\n",
        "platform/z.py": "def f():\n    from . import x\n    return 1\n"})
    assert violations("attack", bad) == ["scratch/attack/a.py:4 imports scratch.report"]
    assert circles(import_graph(bad)) == [["scratch.platform.x", "scratch.platform.y", "scratch.platform.z",
                                           "scratch.platform.x"]]


def test_attack_and_scoring_import_without_platform_frameworks():
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, pkgutil, sys

        BLOCKED = {PLATFORM_ONLY!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked: the attack and scoring layers must not need it")
                return None

        for name in list(sys.modules):
            if name.split(".")[0] in BLOCKED:
                del sys.modules[name]
        sys.meta_path.insert(0, Block())
        done = []
        for pkg in ("tldr_core.attack", "tldr_core.scoring"):
            mod = importlib.import_module(pkg)
            done.append(pkg)
            for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
                importlib.import_module(info.name)
                done.append(info.name)
        leaked = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print(len(done), " ".join(done))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(PACKAGE.parent)})
    assert out.returncode == 0, out.stderr[-3000:]
    count, names = out.stdout.split(" ", 1)
    assert int(count) >= 10 and "tldr_core.attack.train" in names and "tldr_core.scoring.metrics" in names
