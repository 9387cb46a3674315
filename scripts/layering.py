#!/usr/bin/env python3
"""Check that lamina's imports go down the layers and form no cycle.

``python3 scripts/layering.py`` (CI runs it) reads every module under
``src/lamina`` (the generated gRPC code aside) with :mod:`ast`, and fails when

- a module imports a package that stands *above* its own in ``LAYERS``
  (an upward import), or a package of the same layer other than its own
  (a sideways import): a layer may use only the layers below it;
- the modules' imports form a cycle, inside one package or across several.

Every import counts: at the top of a module, inside a function, or under
``TYPE_CHECKING``; a name a module needs is a dependency however it is
imported. ``from pkg import sub`` where ``sub`` is a module depends on
``pkg.sub`` (and not on ``pkg``'s ``__init__``).

``--graph`` prints the package graph instead (one line a package: what it
imports), for docs/architecture.md.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

# Bottom first. A package (or a loose top-level module) may import only from
# the layers listed before its own. One line = one layer; the packages on a
# line do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("lamina",),                 # the version; nothing else lives in __init__
    ("errors",),                 # the one root exception and containerd's classes
    # vocabulary: label names; who owns an object; what check finds
    ("labels", "owners", "problems"),
    ("fs",),                     # dirfd-relative trees, durable files, permissions, walks
    ("util",),                   # kill points, JSON documents, filters, progress, sqlite
    ("oci",),                    # the image spec: documents, platforms, ChainIDs
    ("rootless",),               # the process's user namespace
    ("mounts",),                 # Mount values, mountinfo, ID-mapped mounts
    ("archive",),                # tar streams: apply a layer, write a layer, whiteouts
    ("content", "erofs"),        # the content store; EROFS images from tar streams
    ("snapshots",),              # the snapshotters and their conformance suite
    ("differ",),                 # apply a layer to a snapshot, compare two snapshots
    ("metadata",),               # the root, its records, formats, leases, GC, check
    ("remotes",),                # the distribution protocol: resolve, fetch, push
    ("images",),                 # the image workflow: import, export, pull, push, unpack
    ("containers",),             # containers, tasks on runc, revisions, checkpoints
    ("api",),                    # gRPC servicers and clients
    ("cli",),                    # argument parsing and printing
    ("__main__",),               # python -m lamina
]

SRC = Path(__file__).resolve().parent.parent / "src"
SKIP_PARTS = {"gen", "__pycache__"}


def modules(src: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted((src / "lamina").rglob("*.py")):
        rel = path.relative_to(src)
        if SKIP_PARTS & set(rel.parts[:-1]):
            continue
        name = ".".join(rel.with_suffix("").parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            subs = [f"{base}.{alias.name}" for alias in node.names]
            # `from pkg import sub` depends on the module pkg.sub; names that
            # are not modules are taken from pkg itself.
            targets = [s for s in subs if s in known] or [base]
            if len(targets) < len(subs):
                targets.append(base)
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("lamina") and target != name:
                out.add(target)
    return out


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lamina"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", action="store_true", help="print the package graph")
    parser.add_argument("--src", type=Path, default=SRC,
                        help="the directory holding the lamina package (default: the checkout's)")
    args = parser.parse_args(argv)

    known = modules(args.src)
    edges = {name: imports_of(name, path, known) for name, path in known.items()}
    level = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}

    if args.graph:
        graph: dict[str, set[str]] = defaultdict(set)
        for name, targets in edges.items():
            graph[room(name)] |= {room(t) for t in targets} - {room(name)}
        for pkg in sorted(graph, key=lambda p: (level.get(p, -1), p)):
            print(f"{pkg:12} -> {' '.join(sorted(graph[pkg], key=level.__getitem__)) or '-'}")
        return 0

    problems: list[str] = []
    for name in sorted(known):
        mine = room(name)
        if mine not in level:
            problems.append(f"{name}: package {mine!r} has no layer in scripts/layering.py")
            continue
        for target in sorted(edges[name]):
            theirs = room(target)
            if theirs == mine or theirs not in level:
                continue
            if level[theirs] > level[mine]:
                problems.append(f"{name} imports {target}: upward ({mine} is below {theirs})")
            elif level[theirs] == level[mine]:
                problems.append(f"{name} imports {target}: sideways ({mine} and {theirs} "
                                f"share a layer)")
    for component in cycles(edges):
        problems.append("cycle: " + " -> ".join(component + component[:1]))
    for line in problems:
        print(line)
    count = len(known)
    if problems:
        print(f"layering: {len(problems)} problem(s) in {count} modules")
        return 1
    print(f"layering: {count} modules, {len(LAYERS)} layers, every import goes down, no cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
