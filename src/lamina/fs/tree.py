"""Directory trees of any depth: the stack of descriptors every walk stands on.

A layer can hold a tree far deeper than ``PATH_MAX`` (a container may
``mkdir`` in a loop), so nothing here recurses in Python or builds a path:
every step is relative to a directory file descriptor, opened with
``O_NOFOLLOW | O_DIRECTORY`` (a symlink is never followed), and the depth
lives in an explicit stack.

:class:`DirStack` holds the chain from a root directory down to the current
one, keeping at most :data:`KEEP_OPEN` descriptors open (a 10,000-level tree
must not need 10,000 of them). An ancestor whose descriptor was closed is
reopened through ``..`` of its child on the way up and checked against the
device and inode recorded on the way down; if the tree was moved meanwhile
the walk stops with an error instead of going astray.

The walk itself is :mod:`lamina.fs.walk`; removal :mod:`lamina.fs.remove`.
"""

from __future__ import annotations

import errno
import os

__all__ = ["DIR_FLAGS", "KEEP_OPEN", "DirStack", "proc_path"]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
KEEP_OPEN = 64


def proc_path(dir_fd: int, name: str) -> str:
    """A short path to ``name`` in directory ``dir_fd``, for calls without ``dir_fd``
    (xattrs): the ``/proc`` link stands for the directory itself."""
    return f"/proc/self/fd/{dir_fd}/{name}"


class DirStack:
    """Directories from a root (fd owned by the caller) down to the current one.

    :meth:`push` opens a subdirectory of the current directory, :meth:`pop`
    goes back up; :attr:`fd` is the current directory's descriptor, valid
    until the next push or pop.
    """

    def __init__(self, root_fd: int) -> None:
        st = os.fstat(root_fd)
        self._fds: list[int | None] = [root_fd]
        self._ids: list[tuple[int, int]] = [(st.st_dev, st.st_ino)]
        self.fd = root_fd  # the current directory's (walks read it once an entry)

    @property
    def depth(self) -> int:
        """0 at the root."""
        return len(self._fds) - 1

    @property
    def root_dev(self) -> int:
        return self._ids[0][0]

    def push(self, name: str) -> os.stat_result:
        """Enter subdirectory ``name``; returns its fstat.

        Raises FileNotFoundError / NotADirectoryError (``ELOOP`` for a
        symlink is reported as NotADirectoryError) like ``os.open``.
        """
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotADirectoryError(errno.ENOTDIR, f"{name} is a symlink") from None
            raise
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fds.append(fd)
        self._ids.append((st.st_dev, st.st_ino))
        self.fd = fd
        old = len(self._fds) - 1 - KEEP_OPEN
        if old > 0:  # the root stays open
            closing = self._fds[old]
            if closing is not None:
                os.close(closing)
                self._fds[old] = None
        return st

    def pop(self) -> None:
        """Leave the current directory for its parent (never above the root)."""
        if len(self._fds) == 1:
            raise ValueError("DirStack: pop at the root")
        child = self._fds.pop()
        self._ids.pop()
        assert child is not None
        try:
            if self._fds[-1] is None:
                parent = os.open("..", DIR_FLAGS, dir_fd=child)
                st = os.fstat(parent)
                if (st.st_dev, st.st_ino) != self._ids[-1]:
                    os.close(parent)
                    raise OSError(errno.ESTALE, "directory tree moved while being walked")
                self._fds[-1] = parent
        finally:
            os.close(child)
        top = self._fds[-1]
        assert top is not None
        self.fd = top

    def close(self) -> None:
        """Close every descriptor this stack opened (not the root's)."""
        while len(self._fds) > 1:
            fd = self._fds.pop()
            self._ids.pop()
            if fd is not None:
                os.close(fd)
        root = self._fds[0]
        assert root is not None
        self.fd = root
