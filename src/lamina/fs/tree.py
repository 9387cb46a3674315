"""Walking and removing directory trees of any depth.

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

:func:`remove_tree_at` deletes depth first: it lists a directory once,
unlinks what is not a directory, descends into each subdirectory, and
removes the directory when it comes back up. Entries that vanish meanwhile
are fine; a directory that filled up again is listed again. A directory or
file it may not touch gets ``u+rwx`` on the directory involved and one more
try. It never descends into another filesystem mounted inside the tree (the
``rmdir`` of that mount point then fails with ``EBUSY``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

__all__ = ["DIR_FLAGS", "KEEP_OPEN", "DirStack", "proc_path", "remove_tree_at"]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
KEEP_OPEN = 64
_REFILLS = 100  # times one directory is listed again because it was not empty yet


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

    @property
    def fd(self) -> int:
        fd = self._fds[-1]
        assert fd is not None
        return fd

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

    def close(self) -> None:
        """Close every descriptor this stack opened (not the root's)."""
        while len(self._fds) > 1:
            fd = self._fds.pop()
            self._ids.pop()
            if fd is not None:
                os.close(fd)


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


def _enter(stack: DirStack, name: str) -> os.stat_result | None:
    """Open subdirectory ``name`` for removal; None if it is gone or no directory now."""
    for attempt in (0, 1):
        try:
            return stack.push(name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            if attempt:
                raise
            _chmod_self(stack.fd)
            with contextlib.suppress(OSError, NotImplementedError):
                os.chmod(name, 0o700, dir_fd=stack.fd, follow_symlinks=False)
    return None  # pragma: no cover


def _clear(fd: int, dev: int) -> list[str]:
    """Unlink the non-directories of ``fd``; its subdirectories on device ``dev``."""
    if os.geteuid() != 0:
        _chmod_self(fd)
    subdirs: list[str] = []
    with os.scandir(fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in entries:
        if not is_dir:
            _unlink(fd, name)
            continue
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name, dir_fd=fd, follow_symlinks=False).st_dev == dev:
                subdirs.append(name)
    return subdirs


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
    stack = DirStack(dir_fd)
    try:
        if _enter(stack, name) is None:
            _unlink(dir_fd, name)  # replaced by a non-directory meanwhile
            return
        dev = os.fstat(stack.fd).st_dev
        names = [name]  # the name of each open directory in its parent
        pending = [_clear(stack.fd, dev)]  # subdirectories still to remove, per level
        refills = [0]
        while names:
            if pending[-1]:
                child = pending[-1].pop()
                if _enter(stack, child) is not None:
                    names.append(child)
                    pending.append(_clear(stack.fd, dev))
                    refills.append(0)
                continue
            done = names.pop()
            pending.pop()
            count = refills.pop()
            stack.pop()
            if not _rmdir(stack.fd, done):  # something appeared: list it again
                if count >= _REFILLS:
                    raise OSError(errno.ENOTEMPTY, "directory keeps filling up", done)
                if _enter(stack, done) is not None:
                    names.append(done)
                    pending.append(_clear(stack.fd, dev))
                    refills.append(count + 1)
    finally:
        stack.close()
