"""Resolving a directory path inside a layer's root, symlinked parents included.

The rules are :mod:`lamina.archive.safepath`'s (see there): an absolute
symlink target starts again at the root, a relative one at the symlink's
directory, cleaned lexically; a ``..`` above the root, an empty target or
more than :data:`MAX_SYMLINKS` hops is InvalidArgument, and every step taken
through a target is paid for from the tree's budget. Where a symlink led is
remembered on it (``resolved``, ``epoch``, ``hops``) while the tree's epoch
holds, so a member below a symlink to a deep directory costs a look-up.

Two trees follow these rules: the directories on disk
(:class:`lamina.archive.safepath.DirCache`,
whose children are opened with ``O_NOFOLLOW``) and the layer in memory
(:class:`lamina.erofs.tree.LayerTree`). :func:`resolve` is the walk; a
:class:`Tree` says how to find a child, what a symlink holds and what a
step costs.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

from lamina.errors import InvalidArgument

__all__ = ["MAX_SYMLINKS", "Dir", "Link", "Tree", "resolve", "split_target"]

MAX_SYMLINKS = 40  # as the kernel's path walk

class Dir(Protocol):
    """A directory: 0 deep for the root, whose parent is None."""

    @property
    def depth(self) -> int: ...

    @property
    def parent(self) -> Any: ...


D = TypeVar("D", bound=Dir)  # a directory of the tree


class Link(Protocol[D]):
    """A symlink met as a parent: where it led when last resolved, valid while
    the tree's epoch is ``epoch``, in ``hops`` symlinks."""

    resolved: D | None
    epoch: int
    hops: int


L = TypeVar("L", bound=Link)  # type: ignore[type-arg]


def split_target(target: str) -> tuple[bool, int, list[str]]:
    """A symlink target cleaned lexically: whether it starts at the root, how
    many levels it climbs first, and the components it then walks."""
    comps: list[str] = []
    ups = 0
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp != "..":
            comps.append(comp)
        elif comps:
            comps.pop()
        else:
            ups += 1
    return target.startswith("/"), ups, comps


class Tree(Protocol, Generic[D, L]):
    """What :func:`resolve` needs of a tree of directories ``D`` and symlinks ``L``."""

    @property
    def root(self) -> D: ...

    @property
    def epoch(self) -> int: ...

    def child(self, node: D, comp: str, create: bool, parts: list[str]) -> D | L | None:
        """``comp`` in ``node``: a directory, a symlink, or None (missing, not
        made); InvalidArgument for anything else."""

    def link(self, child: D | L) -> L | None:
        """``child`` as a symlink; None for a directory."""

    def route(self, link: L) -> tuple[str, bool, int, list[str]]:
        """``link``'s target, and :func:`split_target` of it."""

    def rel(self, node: D) -> str:
        """``node``'s resolved path."""

    def spend(self, steps: int, parts: list[str]) -> None:
        """Pay ``steps`` resolution steps from the budget, or raise."""


def _loop(parts: list[str]) -> InvalidArgument:
    return InvalidArgument(
        f"invalid tar layer: too many levels of symbolic links in {'/'.join(parts)!r}")


def resolve(tree: Tree[D, L], parts: list[str], create: bool) -> D | None:
    """The directory at ``parts`` below ``tree``'s root, symlinks resolved inside
    it; None where a component is missing and not ``create``d."""
    node = tree.root
    todo = parts[::-1]  # components still to walk, the next one last
    # symlinks being resolved: (link, len(todo) once its target is walked, hops before it)
    pending: list[tuple[L, int, int]] = []
    hops = 0
    while True:
        while pending and pending[-1][1] == len(todo):
            done, _, before = pending.pop()
            done.resolved, done.epoch, done.hops = node, tree.epoch, hops - before
        if not todo:
            return node
        comp = todo.pop()
        child = tree.child(node, comp, create, parts)
        if child is None:
            return None
        link = tree.link(child)
        if link is None:
            node = child  # type: ignore[assignment]  # not a symlink: a directory
            continue
        if link.resolved is not None and link.epoch == tree.epoch:
            hops += link.hops
            if hops > MAX_SYMLINKS:
                raise _loop(parts)
            node = link.resolved
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            raise _loop(parts)
        where = f"{tree.rel(node)}/{comp}" if node.depth else comp
        target, absolute, ups, comps = tree.route(link)
        if not target:
            raise InvalidArgument(
                f"invalid tar layer: parent {where!r} is a symlink with no target")
        start = tree.root if absolute else node
        if ups > start.depth:
            raise InvalidArgument(
                f"invalid tar layer: parent {where!r} is a symlink to {target!r}, "
                "which leads out of the root directory")
        tree.spend(ups + len(comps) + 1, parts)
        for _ in range(ups):
            start = start.parent
        pending.append((link, len(todo), hops - 1))
        todo.extend(reversed(comps))
        node = start
