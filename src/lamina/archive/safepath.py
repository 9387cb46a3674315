"""Path handling that never leaves a root directory.

Layer member names are cleaned lexically (:func:`clean_path`): a leading
``/`` is dropped (absolute names are relative to the root, as in containerd),
``.`` and empty components vanish and ``..`` removes the previous component;
a ``..`` that would climb above the root is rejected.

Directories are then opened one component at a time, relative to the previous
directory's file descriptor, with ``O_NOFOLLOW | O_DIRECTORY`` (:class:`DirCache`).
A symlink met as a *parent* component is rejected: lamina never resolves
symlinks while unpacking, neither to the outside nor inside the root, so a
layer can only write to the exact path it names. (A layer created by a diff
never needs a symlinked parent.)
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from lamina.errors import InvalidArgument

__all__ = ["DirCache", "clean_path"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def clean_path(name: str) -> list[str]:
    """Split a member name into clean components inside the root; [] is the root."""
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise InvalidArgument(f"invalid tar layer: {name!r} escapes the root directory")
            parts.pop()
        else:
            parts.append(comp)
    return parts


class DirCache:
    """Open directories below a root fd, component by component, never following symlinks.

    The most recently used chain of directories is kept open, so that members
    that arrive grouped by directory (as they do in tar files) cost no extra
    opens. ``on_create`` is called with the path of every directory this
    cache had to create.
    """

    def __init__(self, root_fd: int, on_create: Callable[[str], None] | None = None) -> None:
        self.root_fd = root_fd
        self._names: list[str] = []
        self._fds: list[int] = []
        self._setgid: list[bool] = []
        self._on_create = on_create
        self._root_setgid = bool(os.fstat(root_fd).st_mode & stat.S_ISGID)

    def _truncate(self, depth: int) -> None:
        while len(self._fds) > depth:
            os.close(self._fds.pop())
            self._names.pop()
            self._setgid.pop()

    def clear(self) -> None:
        """Close every cached directory."""
        self._truncate(0)

    def close(self) -> None:
        self.clear()

    def parent_setgid(self) -> bool:
        """Whether the directory last returned by :meth:`get` has the setgid bit."""
        return self._setgid[-1] if self._setgid else self._root_setgid

    def get(self, parts: list[str], *, create: bool) -> int | None:
        """An fd for the directory ``parts`` (relative to the root).

        Missing directories are created (mode 0755) when ``create``, else None
        is returned. A component that is a symlink or not a directory raises
        InvalidArgument. The fd stays owned by the cache.
        """
        depth = 0
        limit = min(len(parts), len(self._names))
        while depth < limit and self._names[depth] == parts[depth]:
            depth += 1
        self._truncate(depth)
        cur = self._fds[-1] if self._fds else self.root_fd
        for i in range(depth, len(parts)):
            comp = parts[i]
            try:
                fd = os.open(comp, _DIR_FLAGS, dir_fd=cur)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(comp, 0o755, dir_fd=cur)
                except FileExistsError:
                    pass
                else:
                    os.chmod(comp, 0o755, dir_fd=cur, follow_symlinks=True)
                    if self._on_create is not None:
                        self._on_create("/".join(parts[: i + 1]))
                fd = self._open_existing(parts, i, cur)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    fd = self._open_existing(parts, i, cur)
                else:
                    raise
            self._fds.append(fd)
            self._names.append(comp)
            self._setgid.append(bool(os.fstat(fd).st_mode & stat.S_ISGID))
            cur = fd
        return cur

    @staticmethod
    def _open_existing(parts: list[str], i: int, cur: int) -> int:
        comp = parts[i]
        where = "/".join(parts[: i + 1])
        try:
            return os.open(comp, _DIR_FLAGS, dir_fd=cur)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            try:
                st = os.lstat(comp, dir_fd=cur)
            except OSError:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise InvalidArgument(
                    f"invalid tar layer: parent {where!r} is a symlink; "
                    "lamina does not follow symlinks in layer paths"
                ) from None
            raise InvalidArgument(
                f"invalid tar layer: parent {where!r} is not a directory"
            ) from None
