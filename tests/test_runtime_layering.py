"""The runtime package's layering: calls go down, through public names only.

``tasks`` composes ``criu``, ``launch`` and ``bundle``; ``criu`` uses ``launch``
and ``bundle``; ``launch`` uses ``bundle`` and ``runc``; ``command`` (is the
command in the rootfs?) uses ``spec``; ``bundle`` uses none of its siblings.
No module imports one above it (not even inside a function or for type
checking), none imports or touches another's ``_private`` names, and
``criu`` is importable in an interpreter that never loads ``tasks``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lamina.containers.runtime as runtime_pkg

PACKAGE = "lamina.containers.runtime"
RUNTIME = Path(runtime_pkg.__file__).parent
MODULES = sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__")

# what each module may import from its siblings (shim runs standalone: none)
ALLOWED: dict[str, set[str]] = {
    "bundle": set(),
    "runc": set(),
    "shim": set(),
    "spec": set(),
    "command": {"spec"},
    "launch": {"bundle", "runc"},
    "criu": {"bundle", "launch"},
    "tasks": {"bundle", "launch", "criu", "runc", "spec", "command"},
}


def _tree(module: str) -> ast.Module:
    return ast.parse((RUNTIME / f"{module}.py").read_text(), filename=f"{module}.py")


def _sibling_imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(sibling module, names imported from it) for every import anywhere in ``tree``."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1 and node.module:
                found.append((node.module.split(".")[0], names))
            elif node.level == 1:  # from . import x
                found.extend((n, []) for n in names)
            elif node.module and node.module.startswith(PACKAGE + "."):
                found.append((node.module[len(PACKAGE) + 1 :].split(".")[0], names))
            elif node.module == PACKAGE:
                found.extend((n, []) for n in names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.append((alias.name[len(PACKAGE) + 1 :].split(".")[0], []))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_every_module_is_placed() -> None:
    # a new module must be given its place in the layering
    assert set(MODULES) == set(ALLOWED)


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down_only(module: str) -> None:
    imported = {sib for sib, _ in _sibling_imports(_tree(module)) if sib in ALLOWED}
    assert imported <= ALLOWED[module], f"{module} imports {sorted(imported - ALLOWED[module])}"


def test_criu_does_not_import_tasks() -> None:
    assert "tasks" not in {sib for sib, _ in _sibling_imports(_tree("criu"))}


def test_import_graph_has_no_cycle() -> None:
    graph = {
        m: {sib for sib, _ in _sibling_imports(_tree(m)) if sib in ALLOWED and sib != m}
        for m in MODULES
    }
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, "import cycle: " + " -> ".join((*path, m))
        if m in done:
            return
        for dep in graph[m]:
            visit(dep, (*path, m))
        done.add(m)

    for m in MODULES:
        visit(m, ())


@pytest.mark.parametrize("module", MODULES)
def test_no_private_names_of_other_modules(module: str) -> None:
    tree = _tree(module)
    bad = [
        f"from .{sib} import {name}"
        for sib, names in _sibling_imports(tree)
        for name in names
        if _private(name)
    ]
    # obj._name on anything but self/cls: another object's private part
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not bad, f"{module} uses private names of others: {bad}"


def test_criu_imports_without_tasks() -> None:
    # a fresh interpreter with the package's __init__ (which imports tasks) left
    # out: criu and everything it needs load, and tasks is never loaded
    script = f"""
import sys, types
pkg = types.ModuleType({PACKAGE!r})
pkg.__path__ = [{str(RUNTIME)!r}]
sys.modules[{PACKAGE!r}] = pkg
import {PACKAGE}.criu
assert {PACKAGE + ".launch"!r} in sys.modules
loaded = sorted(m for m in sys.modules if m.startswith({PACKAGE + "."!r}))
assert {PACKAGE + ".tasks"!r} not in loaded, loaded
print(" ".join(loaded))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{PACKAGE}.bundle" in proc.stdout.split()
