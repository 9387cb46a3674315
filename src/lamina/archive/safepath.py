"""Path handling that never leaves a root directory.

Layer member names are cleaned lexically (:func:`clean_path`): a leading
``/`` is dropped (absolute names are relative to the root, as in containerd),
``.`` and empty components vanish and ``..`` removes the previous component;
a ``..`` that would climb above the root is rejected.

Directories are then opened one component at a time, relative to the previous
directory's file descriptor, with ``O_NOFOLLOW | O_DIRECTORY`` (:class:`DirCache`):
the kernel never follows a symlink on lamina's behalf. A symlink met as a
*parent* component is resolved by lamina itself, inside the root, the way a
container sees it (and containerd applies layers): an absolute target starts
again at the root, a relative one at the symlink's directory, and the target
is cleaned lexically there. A target whose ``..`` climbs above the root
leaves it and is rejected, as are symlink loops (more than 40 hops) and empty
targets. So ``lib/x`` where a lower layer made ``lib -> usr/lib`` lands in
``usr/lib/x``, and nothing can be reached outside. The final component of a
member is never followed (a new entry replaces a symlink there). A parent
directory, once resolved, is at most 2,048 levels deep and 4,095 bytes long
(what a member name can reach without symlinks, PATH_MAX): symlinks cannot
take a tree deeper, nor make each tiny member stand for a path of hundreds
of kilobytes (which every member's bookkeeping would then hold).

Cost. What has been resolved is remembered, so that a layer costs time in
proportion to its size, whatever its symlinks: the directories and symlinks
met are kept as a tree of names (each symlink with the directory it leads
to), and up to :data:`MAX_OPEN` directory fds stay open, least recently used
first out. A member reached through a symlink to a deep directory costs a few
dictionary look-ups, not an open per level. The tree follows what the layer
does: :meth:`DirCache.forget` (called before a name is removed or replaced)
drops the name and everything cached below it and voids every remembered
symlink resolution, so a directory replaced by a symlink (or the reverse) is
looked at afresh; every fd is still obtained by ``O_NOFOLLOW`` opens from
the root, so even a stale entry could only point inside the root. Whatever
cannot be served from the cache (opening existing entries, re-opening
evicted directories, walking a symlink's target) is counted against a
budget per layer of :data:`WORK_BASE` steps plus :data:`WORK_PER_LOOKUP` per
path looked up; a layer going past it (symlink chains that defeat the cache
on purpose) is InvalidArgument "too many symlink resolutions". Directories
the layer creates are not counted: they are bounded by its size.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lamina.archive import limits
from lamina.archive.resolve import MAX_SYMLINKS, resolve, split_target
from lamina.archive.tarstream import show_name
from lamina.errors import InvalidArgument
from lamina.fs.tree import DIR_FLAGS

__all__ = ["MAX_OPEN", "MAX_SYMLINKS", "WORK", "WORK_BASE", "WORK_PER_LOOKUP", "DirCache",
           "Work", "clean_path"]

MAX_OPEN = 64  # directory fds one cache holds open (several layers may apply at once)
WORK_BASE = 1 << 20  # resolution steps any layer may take ...
WORK_PER_LOOKUP = 64  # ... plus this many per path it looks up


@dataclass
class Work:
    """What every :class:`DirCache` of this process did, for tests and benchmarks:
    ``syscalls`` made on existing entries (open, lstat, readlink), ``created``
    directories (mkdir), ``steps`` walked through symlink targets, ``lookups``
    (calls of :meth:`DirCache.get`)."""

    syscalls: int = 0
    created: int = 0
    steps: int = 0
    lookups: int = 0


WORK = Work()


def clean_path(name: str) -> list[str]:
    """Split a member name into clean components inside the root; [] is the root."""
    split = name.split("/")
    if ".." not in split:  # the usual name: its clean parts found without a loop per part
        parts = list(filter(None, split))
        if parts and parts[0] == ".":
            del parts[0]
        if "." in parts:
            parts = [comp for comp in parts if comp != "."]
        return parts
    parts = []
    for comp in split:
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise InvalidArgument(f"invalid tar layer: {name!r} escapes the root directory")
            parts.pop()
        else:
            parts.append(comp)
    return parts


class _Dir:
    """A directory known to be at ``parent/name`` (opened with O_NOFOLLOW)."""

    __slots__ = ("alive", "children", "depth", "fd", "name", "parent", "pins", "rel", "size")

    def __init__(self, name: str, parent: _Dir | None) -> None:
        self.name = name
        self.parent = parent
        self.depth: int = parent.depth + 1 if parent is not None else 0
        # bytes of the resolved path
        self.size: int = (parent.size + bool(parent.depth) + len(os.fsencode(name))
                          if parent is not None else 0)
        self.children: dict[str, _Dir | _Link] = {}
        self.fd = -1
        self.pins = 0
        self.alive = True
        self.rel: str | None = None if parent is not None else ""


class _Link:
    """A symlink at ``parent/name``, its target cleaned lexically: from the root
    (``absolute``) or from ``parent`` climbed ``ups`` levels, then ``comps``."""

    __slots__ = ("absolute", "comps", "epoch", "hops", "name", "parent", "resolved", "target",
                 "ups")

    def __init__(self, name: str, parent: _Dir, target: str) -> None:
        self.name = name
        self.parent = parent
        self.target = target
        self.absolute, self.ups, self.comps = split_target(target)
        # the directory it led to when last resolved, valid while the epoch holds
        self.resolved: _Dir | None = None
        self.epoch = -1
        self.hops = 0


def _rel(node: _Dir) -> str:
    """``node``'s resolved path (cached on it)."""
    if node.rel is None:
        names: list[str] = []
        cur: _Dir | None = node
        while cur is not None and cur.rel is None:
            names.append(cur.name)
            cur = cur.parent
        base = cur.rel if cur is not None else ""
        names.reverse()
        tail = "/".join(names)
        node.rel = f"{base}/{tail}" if base else tail
    return node.rel


class _Tree:
    """What every handle of one :class:`DirCache` shares: the names met, the
    open fds (LRU) and the work done."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.root = _Dir("", None)
        self.root.fd = root_fd
        self.open: OrderedDict[_Dir, None] = OrderedDict()  # nodes holding an fd, oldest first
        self.by_fd: dict[int, _Dir] = {root_fd: self.root}
        self.epoch = 0
        self.work = 0
        self.lookups = 0

    # -- fds ----------------------------------------------------------------
    def fd_of(self, node: _Dir) -> int:
        """``node``'s fd, re-opening it (and ancestors) if it was evicted."""
        if node.fd >= 0:
            if node is not self.root:
                self.open.move_to_end(node)
            return node.fd
        chain: list[_Dir] = []
        cur: _Dir | None = node
        while cur is not None and cur.fd < 0:
            chain.append(cur)
            cur = cur.parent
        assert cur is not None  # the root always has its fd
        self.spend(len(chain))
        WORK.syscalls += len(chain)
        parent_fd = cur.fd
        for item in reversed(chain):
            try:
                fd = os.open(item.name, DIR_FLAGS, dir_fd=parent_fd)
            except OSError as exc:  # pragma: no cover - the tree follows every change
                raise InvalidArgument(
                    f"invalid tar layer: directory {_rel(item)!r} changed while in use: "
                    f"{exc.strerror}") from None
            self.keep(item, fd)
            parent_fd = fd
        return node.fd

    def keep(self, node: _Dir, fd: int) -> None:
        node.fd = fd
        self.by_fd[fd] = node
        self.open[node] = None
        while len(self.open) > MAX_OPEN:
            old = next(iter(self.open))
            if old.pins or old is node:
                self.open.move_to_end(old)  # at most a few are pinned
                continue
            self.drop_fd(old)

    def drop_fd(self, node: _Dir) -> None:
        if node.fd >= 0 and node is not self.root:
            self.open.pop(node, None)
            del self.by_fd[node.fd]
            os.close(node.fd)
            node.fd = -1

    def unpin(self, node: _Dir) -> None:
        node.pins -= 1
        if not node.pins and not node.alive:
            self.drop_fd(node)

    # -- invalidation ------------------------------------------------------
    def kill(self, top: _Dir | _Link) -> None:
        """Forget ``top`` and everything below it; void symlink resolutions."""
        self.epoch += 1
        todo: list[_Dir | _Link] = [top]
        while todo:
            node = todo.pop()
            if isinstance(node, _Link):
                node.resolved = None
                continue
            node.alive = False
            todo.extend(node.children.values())
            node.children = {}
            if not node.pins:
                self.drop_fd(node)

    def forget_all(self) -> None:
        for child in list(self.root.children.values()):
            self.kill(child)
        self.root.children = {}
        self.epoch += 1

    # -- budget ----------------------------------------------------------
    def spend(self, n: int) -> None:
        self.work += n
        if self.work > WORK_BASE + WORK_PER_LOOKUP * self.lookups:
            raise _TooMuchWork


class _TooMuchWork(Exception):
    pass


class DirCache:
    """Open directories below a root fd, component by component, resolving
    symlinked components inside the root (see the module docs).

    ``on_create`` is called with the (resolved) path of every directory this
    cache had to create. :meth:`view` gives a second handle on the same cache
    (its own last result, the same tree, fds and budget).
    """

    def __init__(self, root_fd: int, on_create: Callable[[str], None] | None = None,
                 *, _tree: _Tree | None = None) -> None:
        self.root_fd = root_fd
        self._tree = _tree if _tree is not None else _Tree(root_fd)
        self._on_create = on_create
        self._last: _Dir | None = None

    def view(self) -> DirCache:
        """Another handle sharing this cache; its results stay open until its
        own next :meth:`get`, whatever this one does."""
        return DirCache(self.root_fd, _tree=self._tree)

    def _pin(self, node: _Dir | None) -> None:
        if self._last is not None:
            self._tree.unpin(self._last)
        self._last = node
        if node is not None:
            node.pins += 1

    def clear(self) -> None:
        """Forget everything cached (every handle's tree)."""
        self._pin(None)
        self._tree.forget_all()

    def close(self) -> None:
        """Close what this handle holds; the last handle closed closes every fd."""
        self._pin(None)
        tree = self._tree
        for node in list(tree.open):
            if not node.pins:
                tree.drop_fd(node)

    def forget(self, parent_fd: int, name: str) -> None:
        """``name`` in the directory ``parent_fd`` is about to be removed or
        replaced: drop what is cached at and below it. For an fd this cache
        did not hand out, everything is dropped."""
        tree = self._tree
        parent = tree.by_fd.get(parent_fd)
        if parent is None:
            tree.forget_all()
            return
        child = parent.children.pop(name, None)
        if child is not None:
            tree.kill(child)

    @property
    def path(self) -> list[str]:
        """The resolved components of the directory last returned by :meth:`get`
        (symlinks replaced by where they lead)."""
        rel = _rel(self._last) if self._last is not None else ""
        return rel.split("/") if rel else []

    @property
    def rel(self) -> str:
        """:attr:`path` joined with ``/``."""
        return _rel(self._last) if self._last is not None else ""

    def parent_setgid(self) -> bool:
        """Whether the directory last returned by :meth:`get` has the setgid bit."""
        node = self._last if self._last is not None else self._tree.root
        return bool(os.fstat(self._tree.fd_of(node)).st_mode & stat.S_ISGID)

    def get(self, parts: list[str], *, create: bool) -> int | None:
        """An fd for the directory ``parts`` (relative to the root).

        Missing directories are created (mode 0755) when ``create``, else None
        is returned. A symlinked component is resolved inside the root; one
        that leaves it, loops, or a component that is not a directory raises
        InvalidArgument, as does a layer past its work budget. The fd stays
        owned by the cache until this handle's next call; :attr:`path` tells
        where it is.
        """
        tree = self._tree
        tree.lookups += 1
        WORK.lookups += 1
        try:
            node = self._resolve(parts, create)
        except _TooMuchWork:
            raise InvalidArgument(
                f"invalid tar layer: too many symlink resolutions at {show_name('/'.join(parts))}"
                f" (over {WORK_BASE} + {WORK_PER_LOOKUP} per path of resolution steps)"
            ) from None
        self._pin(node)
        if node is None:
            return None
        return tree.fd_of(node)

    def _resolve(self, parts: list[str], create: bool) -> _Dir | None:
        return resolve(_OnDisk(self), parts, create)

    def _lookup(self, node: _Dir, comp: str, create: bool,
                parts: list[str]) -> _Dir | _Link | None:
        """Find ``comp`` in ``node`` on disk (creating a directory if asked) and
        remember it; None if missing. Directories made here cost no budget."""
        tree = self._tree
        if node.depth >= limits.MAX_DEPTH:
            raise InvalidArgument(
                f"invalid tar layer: {show_name('/'.join(parts))} leads more than "
                f"{limits.MAX_DEPTH} directories deep")
        size = node.size + bool(node.depth) + len(os.fsencode(comp))
        if size >= limits.MAX_PATH:
            raise InvalidArgument(
                f"invalid tar layer: {show_name('/'.join(parts))} leads to a directory path "
                f"of {size} bytes once symlinks are resolved (limit {limits.MAX_PATH - 1}, "
                "PATH_MAX)")
        pfd = tree.fd_of(node)
        WORK.syscalls += 1
        try:
            return self._add(node, comp, os.open(comp, DIR_FLAGS, dir_fd=pfd), spend=1)
        except FileNotFoundError:
            if not create:
                tree.spend(1)
                return None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            return self._existing(node, comp, pfd)
        try:
            os.mkdir(comp, 0o755, dir_fd=pfd)
        except FileExistsError:
            return self._existing(node, comp, pfd)
        WORK.created += 1
        os.chmod(comp, 0o755, dir_fd=pfd, follow_symlinks=True)
        base = _rel(node)
        rel = f"{base}/{comp}" if base else comp
        if self._on_create is not None:
            self._on_create(rel)
        try:
            child = self._add(node, comp, os.open(comp, DIR_FLAGS, dir_fd=pfd), spend=0)
        except OSError as exc:  # pragma: no cover - just made
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            return self._existing(node, comp, pfd)
        child.rel = rel
        return child

    def _add(self, node: _Dir, comp: str, fd: int, *, spend: int) -> _Dir:
        child = _Dir(comp, node)
        node.children[comp] = child
        self._tree.keep(child, fd)
        self._tree.spend(spend)
        return child

    def _existing(self, node: _Dir, comp: str, pfd: int) -> _Dir | _Link:
        """Open ``comp`` in ``node``, or (a symlink) remember where it leads."""
        WORK.syscalls += 1
        try:
            return self._add(node, comp, os.open(comp, DIR_FLAGS, dir_fd=pfd), spend=2)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        self._tree.spend(4)
        WORK.syscalls += 2
        try:
            st = os.lstat(comp, dir_fd=pfd)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            link = _Link(comp, node, os.readlink(comp, dir_fd=pfd))
            node.children[comp] = link
            return link
        where = f"{_rel(node)}/{comp}" if node.depth else comp
        raise InvalidArgument(f"invalid tar layer: parent {where!r} is not a directory")


class _OnDisk:
    """The :class:`lamina.archive.resolve.Tree` of one :class:`DirCache` handle:
    children found in the cache, else opened (or made) on disk. One is made per
    resolve, so it holds the root and the epoch that resolve starts from."""

    def __init__(self, cache: DirCache) -> None:
        self._cache = cache
        self._tree = cache._tree
        self.root = self._tree.root
        self.epoch = self._tree.epoch

    def child(self, node: _Dir, comp: str, create: bool, parts: list[str]) -> _Dir | _Link | None:
        child = node.children.get(comp)
        if child is None:
            child = self._cache._lookup(node, comp, create, parts)
        return child

    def link(self, child: _Dir | _Link) -> _Link | None:
        return child if isinstance(child, _Link) else None

    def route(self, link: _Link) -> tuple[str, bool, int, list[str]]:
        return link.target, link.absolute, link.ups, link.comps

    def rel(self, node: _Dir) -> str:
        return _rel(node)

    def spend(self, steps: int, parts: list[str]) -> None:
        self._tree.spend(steps)
        WORK.steps += steps
