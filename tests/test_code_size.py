"""Files a reader can take in at once: no module of tldr_core over 400 lines, no function over 60, and no
platform folder with more than about ten modules at one level (search/ holds 11 today; 12 is the bar, so
a twelfth module passes and a thirteenth asks for a sub-folder)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tldr_core"
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PLATFORM_MODULES = 400, 60, 12


def too_long(source: str, name: str) -> list[str]:
    """What in one module's source breaks the limits, as 'name: what' lines."""
    found = []
    lines = source.count("\n")
    if lines > MAX_MODULE_LINES:
        found.append(f"{name}: {lines} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}: {node.name}() is {length} lines")
    return found


def test_the_check_catches_a_long_module_and_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert too_long(f"def f():\n{body}\n", "m.py") == [f"m.py: f() is {MAX_FUNCTION_LINES + 1} lines"]
    assert too_long("x = 1\n" * (MAX_MODULE_LINES + 1), "m.py") == [f"m.py: {MAX_MODULE_LINES + 1} lines"]
    assert too_long("def f():\n    return 1\n", "m.py") == []


def test_no_module_or_function_of_tldr_core_is_too_long():
    found = [hit for p in sorted(PACKAGE.rglob("*.py"))
             for hit in too_long(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert found == []


def test_no_platform_folder_holds_more_than_about_ten_modules():
    platform = PACKAGE / "platform"
    crowded = {}
    for folder in [platform, *(d for d in platform.rglob("*") if d.is_dir() and d.name != "__pycache__")]:
        modules = [f for f in folder.glob("*.py") if f.name != "__init__.py"]
        if len(modules) > MAX_PLATFORM_MODULES:
            crowded[str(folder.relative_to(PACKAGE.parent))] = len(modules)
    assert crowded == {}
