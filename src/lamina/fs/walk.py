"""The one directory walker: any depth, bounded descriptors, no path built.

:class:`Walk` yields every entry below a root directory, parents before
children, each with its ``lstat`` and the descriptor of the directory that
holds it, so callers read, open or change the entry relative to that
descriptor (a symlink is never followed and no path reaches the kernel:
trees deeper than ``PATH_MAX`` are fine). The walk goes into a directory
only when the caller asks, by calling :meth:`Walk.enter` while handling that
directory's entry; the directory's own entries come next. That one call is
how every user prunes: usage counts each inode once, a diff descends where
the tree changed, removal stays on one filesystem.

Depth lives in an explicit stack (:class:`lamina.fs.tree.DirStack`, which
keeps at most :data:`lamina.fs.tree.KEEP_OPEN` descriptors open), never in
Python's: a 10,000-level tree walks like a flat one. Names are listed when
the walk first reaches a directory (not when it is entered), then visited in
the order the caller chose: sorted by a key, or as the directory lists them.
An entry that vanishes between the listing and its ``lstat`` is passed over.

:class:`PairedWalk` walks two trees side by side (a lower and an upper, for a
diff): it yields each name either tree has, with the entry on each side
(None where it is missing), and entering a directory enters the lower's
directory of the same name too where there is one.

Descriptors handed out (:attr:`Entry.parent`, what :meth:`enter` returns)
are valid until the walk moves on to the next entry.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from lamina.fs.tree import DirStack

__all__ = ["BYTES", "Entry", "Pair", "PairedWalk", "Walk", "enter_present", "list_names"]

Key = Callable[[str], Any]
BYTES: Key = os.fsencode
"""Sort key for bytewise name order (what ``sort`` and Go's walks give)."""

OnLeave = Callable[[int, str], bool]
"""Called as the walk leaves an entered directory, with its parent's descriptor
and its name; True walks the directory again (it filled up meanwhile)."""


def list_names(fd: int, *, sort: bool = True, key: Key | None = None) -> list[str]:
    """The names in directory ``fd``, in visiting order reversed (``pop()`` gives
    the next): sorted by ``key`` (None: as strings), or in directory order."""
    names = os.listdir(fd)
    if sort:
        names.sort(key=key, reverse=True)
    else:
        names.reverse()
    return names


class Entry(NamedTuple):
    """One entry: ``path`` (relative, ``/``-joined), ``name`` in directory ``parent``
    (a descriptor), its lstat ``stat``, and ``depth`` (1 below the root)."""

    path: str
    name: str
    parent: int
    stat: os.stat_result
    depth: int


class _Level:
    """One directory of a walk: its path prefix, its name in its parent, the names
    still to visit (listed on the first visit), what to do on leaving."""

    __slots__ = ("name", "names", "on_leave", "prefix")

    def __init__(self, prefix: str, name: str, on_leave: OnLeave | None) -> None:
        self.prefix = prefix
        self.name = name
        self.names: list[str] | None = None
        self.on_leave = on_leave


class _Names(Protocol):
    names: list[str] | None


V = TypeVar("V", bound=_Names)


class _Levels(Generic[V]):
    """The stack of directories a walk is in, one level per directory; each lists
    its names on the first visit (:meth:`_list`) and is left once they are
    visited (:meth:`_leave`)."""

    _levels: list[V]

    def _names(self) -> Iterator[tuple[V, str]]:
        """Each level with the next name to visit, depth first."""
        levels = self._levels
        while levels:
            level = levels[-1]
            if level.names is None:
                self._list(level)
            if level.names:
                yield level, level.names.pop()
                continue
            levels.pop()
            if levels:
                self._leave(level)

    def _list(self, level: V) -> None:
        raise NotImplementedError

    def _leave(self, level: V) -> None:
        raise NotImplementedError


class Walk(_Levels[_Level]):
    """Every entry below the directory ``root_fd`` (owned by the caller), depth
    first, parents before children, sorted by ``key`` within a directory (None:
    as strings; ``sort=False``: in directory order, the cheapest). Iterate
    once; :meth:`enter` goes down."""

    def __init__(self, root_fd: int, *, sort: bool = True, key: Key | None = None) -> None:
        self._dirs = DirStack(root_fd)
        self._sort = sort
        self._key = key
        self._levels = [_Level("", "", None)]
        self._current: Entry | None = None

    def __iter__(self) -> Iterator[Entry]:
        dirs = self._dirs
        try:
            for level, name in self._names():
                try:
                    st = os.stat(name, dir_fd=dirs.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                self._current = Entry(level.prefix + name, name, dirs.fd, st, len(self._levels))
                yield self._current
        finally:
            self._current = None
            dirs.close()

    def _list(self, level: _Level) -> None:
        level.names = list_names(self._dirs.fd, sort=self._sort, key=self._key)

    def _leave(self, level: _Level) -> None:
        self._dirs.pop()
        if level.on_leave is not None and level.on_leave(self._dirs.fd, level.name):
            self._reenter(level)

    def enter(self, *, on_leave: OnLeave | None = None) -> int:
        """Go into the directory just yielded (its entries come next); returns its
        descriptor. Raises like :meth:`lamina.fs.tree.DirStack.push` (the entry
        vanished or is no directory now: FileNotFoundError, NotADirectoryError)."""
        entry = self._current
        if entry is None:
            raise ValueError("Walk.enter: no entry to enter")
        self._dirs.push(entry.name)
        self._current = None
        self._levels.append(_Level(entry.path + "/", entry.name, on_leave))
        return self._dirs.fd

    def _reenter(self, level: _Level) -> None:
        try:
            self._dirs.push(level.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        level.names = None
        self._levels.append(level)


class Pair(NamedTuple):
    """One name of a :class:`PairedWalk`: ``path``, ``name``, ``depth`` (1 below the
    roots), and on each side the directory descriptor holding it and its lstat
    (None: not on that side)."""

    path: str
    name: str
    depth: int
    upper: int
    upper_stat: os.stat_result | None
    lower: int | None
    lower_stat: os.stat_result | None


class _PairLevel:
    __slots__ = ("lower", "lower_names", "names", "prefix", "upper_names")

    def __init__(self, prefix: str, lower: bool) -> None:
        self.prefix = prefix
        self.lower = lower  # a lower directory is entered at this level
        self.names: list[str] | None = None
        self.upper_names: set[str] = set()
        self.lower_names: set[str] = set()


class PairedWalk(_Levels[_PairLevel]):
    """The names below ``upper_fd`` and ``lower_fd`` (None: an empty lower), sorted
    by ``key`` (None: as strings) within a directory, parents first. A name only
    the lower has comes with ``upper_stat`` None; one the upper has but that vanished before
    its lstat is passed over. :meth:`enter` goes down on both sides."""

    def __init__(self, upper_fd: int, lower_fd: int | None, *, key: Key | None = None) -> None:
        self._ups = DirStack(upper_fd)
        self._lows = DirStack(lower_fd) if lower_fd is not None else None
        self._key = key
        self._levels = [_PairLevel("", lower_fd is not None)]
        self._current: Pair | None = None

    def __iter__(self) -> Iterator[Pair]:
        ups = self._ups
        try:
            for level, name in self._names():
                lower_fd = self._lows.fd if level.lower and self._lows is not None else None
                ust: os.stat_result | None = None
                if name in level.upper_names:
                    try:
                        ust = os.stat(name, dir_fd=ups.fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                lst: os.stat_result | None = None
                if name in level.lower_names and lower_fd is not None:
                    try:
                        lst = os.stat(name, dir_fd=lower_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        lst = None
                self._current = Pair(level.prefix + name, name, len(self._levels), ups.fd, ust,
                                     lower_fd, lst)
                yield self._current
        finally:
            self._current = None
            ups.close()
            if self._lows is not None:
                self._lows.close()

    def _leave(self, level: _PairLevel) -> None:
        self._ups.pop()
        if level.lower:
            assert self._lows is not None
            self._lows.pop()

    def _list(self, level: _PairLevel) -> None:
        level.upper_names = set(os.listdir(self._ups.fd))
        if level.lower and self._lows is not None:
            level.lower_names = set(os.listdir(self._lows.fd))
        names = list(level.upper_names | level.lower_names)
        names.sort(key=self._key, reverse=True)
        level.names = names

    def enter(self) -> int:
        """Go into the upper directory just yielded, and into the lower one of the
        same name where the lower has a directory there; returns the upper's
        descriptor. Raises like :meth:`lamina.fs.tree.DirStack.push` for the upper."""
        pair = self._current
        if pair is None or pair.upper_stat is None:
            raise ValueError("PairedWalk.enter: no upper directory to enter")
        self._ups.push(pair.name)
        self._current = None
        lower = False
        if pair.lower_stat is not None and stat.S_ISDIR(pair.lower_stat.st_mode):
            assert self._lows is not None
            try:
                self._lows.push(pair.name)
                lower = True
            except (FileNotFoundError, NotADirectoryError):
                lower = False
        self._levels.append(_PairLevel(pair.path + "/", lower))
        return self._ups.fd


def enter_present(walk: Walk | PairedWalk) -> int | None:
    """``walk.enter()``; None where the directory just yielded vanished or is no
    directory any more (a tree that changes while it is walked)."""
    try:
        return walk.enter()
    except (FileNotFoundError, NotADirectoryError):
        return None
