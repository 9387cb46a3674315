"""The container wing's layering: one service on top, calls go down only.

``service`` composes ``revisions``, ``tasks`` and ``checkpoint``; those three
never import one another, and use only ``options``, ``taskstate`` and the
``runtime`` package below them (see ``lamina.containers``' docstring).
``autoremove``, the watcher ``run -d --rm`` starts, stands on the service. The
runtime package's own order is tested in ``test_runtime_layering``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lamina.containers as containers_pkg

PACKAGE = "lamina.containers"
WING = Path(containers_pkg.__file__).parent
MODULES = sorted(p.stem for p in WING.glob("*.py") if p.stem != "__init__")

_BELOW = {"options", "taskstate", "runtime"}
ALLOWED: dict[str, set[str]] = {
    "autoremove": {"service"} | _BELOW,
    "service": {"revisions", "tasks", "checkpoint", "logs", "network"} | _BELOW,
    "logs": set(),
    "revisions": _BELOW,
    "tasks": _BELOW,
    "checkpoint": _BELOW,
    "network": _BELOW,
    "options": {"runtime"},
    "taskstate": {"runtime"},
}


def _wing_imports(module: str) -> set[str]:
    """The modules of the wing that ``module`` imports, anywhere in it."""
    tree = ast.parse((WING / f"{module}.py").read_text(), filename=f"{module}.py")
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level == 1:
                found.add(node.module.split(".")[0])
            elif node.module.startswith(PACKAGE + "."):
                found.add(node.module[len(PACKAGE) + 1:].split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name[len(PACKAGE) + 1:].split(".")[0] for a in node.names
                      if a.name.startswith(PACKAGE + ".")}
    return found - {module}


def test_every_module_is_placed() -> None:
    # a new module must be given its place in the wing
    assert set(MODULES) == set(ALLOWED)


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down_only(module: str) -> None:
    imported = _wing_imports(module)
    assert imported <= ALLOWED[module], f"{module} imports {sorted(imported - ALLOWED[module])}"
