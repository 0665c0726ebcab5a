"""The layer boundaries: attack <- scoring <- report <- platform / cli (each imports only downwards),
and the attack and scoring layers import without the platform's frameworks (ray, mlflow, optuna,
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


def violations(layer: str) -> list[str]:
    out = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])
        for line, name in imported_modules(path.read_text(), package):
            parts = name.split(".")
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
            if parts[0] == "tldr_core" and len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                out.append(where)
            if parts[0] in PLATFORM_ONLY:
                out.append(where)
    return out


def test_import_parser_sees_relative_and_lazy_imports():
    src = "from ..scoring import metrics\n\ndef f():\n    import mlflow.pyfunc\n    from .models import X\n"
    found = sorted(imported_modules(src, "tldr_core.attack"))
    assert found == [(1, "tldr_core.scoring"), (4, "mlflow.pyfunc"), (5, "tldr_core.attack.models")]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    assert violations(layer) == []


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
