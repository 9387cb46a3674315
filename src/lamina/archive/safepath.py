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
again at the root, a relative one at the symlink's directory. A target whose
``..`` climbs above the root leaves it and is rejected, as are symlink loops
(more than 40 hops) and empty targets. So ``lib/x`` where a lower layer made
``lib -> usr/lib`` lands in ``usr/lib/x``, and nothing can be reached outside.
The final component of a member is never followed (a new entry replaces a
symlink there).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from lamina.errors import InvalidArgument

__all__ = ["DirCache", "clean_path"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SYMLINKS = 40  # as the kernel's path walk


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
    """Open directories below a root fd, component by component, resolving
    symlinked components inside the root (see the module docs).

    The most recently used chain of directories is kept open, so that members
    that arrive grouped by directory (as they do in tar files) cost no extra
    opens. ``on_create`` is called with the (resolved) path of every
    directory this cache had to create.
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

    @property
    def path(self) -> list[str]:
        """The resolved components of the directory last returned by :meth:`get`
        (symlinks replaced by where they lead)."""
        return list(self._names)

    def parent_setgid(self) -> bool:
        """Whether the directory last returned by :meth:`get` has the setgid bit."""
        return self._setgid[-1] if self._setgid else self._root_setgid

    def get(self, parts: list[str], *, create: bool) -> int | None:
        """An fd for the directory ``parts`` (relative to the root).

        Missing directories are created (mode 0755) when ``create``, else None
        is returned. A symlinked component is resolved inside the root; one
        that leaves it, loops, or a component that is not a directory raises
        InvalidArgument. The fd stays owned by the cache; :attr:`path` tells
        where it is.
        """
        original = "/".join(parts)
        for _ in range(MAX_SYMLINKS + 1):
            found = self._walk(parts, create=create)
            if not isinstance(found, list):
                return found
            parts = found
        raise InvalidArgument(
            f"invalid tar layer: too many levels of symbolic links in {original!r}")

    def _walk(self, parts: list[str], *, create: bool) -> int | list[str] | None:
        """Open ``parts``; at a symlinked component, the parts it leads to instead."""
        depth = 0
        limit = min(len(parts), len(self._names))
        while depth < limit and self._names[depth] == parts[depth]:
            depth += 1
        self._truncate(depth)
        cur = self._fds[-1] if self._fds else self.root_fd
        for i in range(depth, len(parts)):
            comp = parts[i]
            try:
                opened: int | list[str] = os.open(comp, _DIR_FLAGS, dir_fd=cur)
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
                opened = self._open_existing(parts, i, cur)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    opened = self._open_existing(parts, i, cur)
                else:
                    raise
            if isinstance(opened, list):
                return opened  # a symlink: the caller walks where it leads
            fd = opened
            self._fds.append(fd)
            self._names.append(comp)
            self._setgid.append(bool(os.fstat(fd).st_mode & stat.S_ISGID))
            cur = fd
        return cur

    @staticmethod
    def _open_existing(parts: list[str], i: int, cur: int) -> int | list[str]:
        """Open component ``i``, or (a symlink) the parts it leads to."""
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
                return _follow(os.readlink(comp, dir_fd=cur), parts, i, where)
            raise InvalidArgument(
                f"invalid tar layer: parent {where!r} is not a directory"
            ) from None


def _follow(target: str, parts: list[str], i: int, where: str) -> list[str]:
    """The components ``parts`` stand for when ``parts[i]`` is a symlink to ``target``."""
    if not target:
        raise InvalidArgument(f"invalid tar layer: parent {where!r} is a symlink with no target")
    base = [] if target.startswith("/") else list(parts[:i])  # absolute: from the root
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not base:
                raise InvalidArgument(
                    f"invalid tar layer: parent {where!r} is a symlink to {target!r}, "
                    "which leads out of the root directory")
            base.pop()
        else:
            base.append(comp)
    return base + parts[i + 1:]
