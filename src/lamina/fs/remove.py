"""Removing a directory tree of any depth.

:func:`remove_tree_at` deletes depth first with :class:`lamina.fs.walk.Walk`:
what is not a directory is unlinked as the walk meets it, each subdirectory
is entered, and removed as the walk leaves it. Entries that vanish meanwhile
are fine; a directory that filled up again is walked again (at most
:data:`REFILLS` times). A directory or file it may not touch gets ``u+rwx``
on the directory involved and one more try. It never descends into another
filesystem mounted inside the tree (the ``rmdir`` of that mount point then
fails with ``EBUSY``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable

from lamina.fs.tree import DIR_FLAGS
from lamina.fs.walk import Entry, Walk

__all__ = ["REFILLS", "remove_tree_at"]

REFILLS = 100  # times one directory is walked again because it was not empty yet


def _chmod_self(fd: int) -> None:
    """Give the owner rwx on the open directory ``fd`` (so entries can go)."""
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o700 != 0o700:
            os.fchmod(fd, mode | 0o700)


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        _chmod_self(dir_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def _rmdir(dir_fd: int, name: str) -> bool:
    """rmdir; False if the directory is not empty (it filled up again)."""
    for attempt in (0, 1):
        try:
            os.rmdir(name, dir_fd=dir_fd)
            return True
        except FileNotFoundError:
            return True
        except PermissionError:
            if attempt:
                raise
            _chmod_self(dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
    return True  # pragma: no cover - the loop returns or raises


def _retrying(dir_fd: int, name: str, open_it: Callable[[], int]) -> int | None:
    """``open_it()`` (the directory ``name`` in ``dir_fd``), once more after giving
    the owner rwx on both; None if it is gone or no directory now."""
    for attempt in (0, 1):
        try:
            fd = open_it()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            if attempt:
                raise
            _chmod_self(dir_fd)
            with contextlib.suppress(OSError, NotImplementedError):
                os.chmod(name, 0o700, dir_fd=dir_fd, follow_symlinks=False)
            continue
        if os.geteuid() != 0:
            _chmod_self(fd)
        return fd
    return None  # pragma: no cover


class _Leaving:
    """Removes an entered directory as the walk leaves it; asks for another walk
    while it keeps filling up."""

    def __init__(self) -> None:
        self.refills = 0

    def __call__(self, parent_fd: int, name: str) -> bool:
        if _rmdir(parent_fd, name):
            return False
        if self.refills >= REFILLS:
            raise OSError(errno.ENOTEMPTY, "directory keeps filling up", name)
        self.refills += 1
        return True


def _empty(fd: int, dev: int) -> None:
    """Remove everything below the open directory ``fd`` on device ``dev``."""
    walk = Walk(fd, sort=False)
    for e in walk:
        if not stat.S_ISDIR(e.stat.st_mode):
            _unlink(e.parent, e.name)
        elif e.stat.st_dev == dev:
            _enter(walk, e)


def _enter(walk: Walk, e: Entry) -> None:
    def open_it() -> int:
        return walk.enter(on_leave=_Leaving())

    _retrying(e.parent, e.name, open_it)


def remove_tree_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` in directory ``dir_fd`` and everything below it.

    A missing ``name`` is fine; a symlink is removed, never followed.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(dir_fd, name)
        return
    def open_it() -> int:
        try:
            return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink now
                raise NotADirectoryError(errno.ENOTDIR, f"{name} is a symlink") from None
            raise

    for _ in range(REFILLS + 1):
        fd = _retrying(dir_fd, name, open_it)
        if fd is None:
            _unlink(dir_fd, name)  # replaced by a non-directory meanwhile (or gone)
            return
        try:
            _empty(fd, os.fstat(fd).st_dev)
        finally:
            os.close(fd)
        if _rmdir(dir_fd, name):
            return
    raise OSError(errno.ENOTEMPTY, "directory keeps filling up", name)
