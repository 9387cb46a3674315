"""A tiny language of filesystem changes, and a tree comparison.

The conformance cases describe each layer as an :class:`Applier`: a sequence
of operations (create a file, make a directory, remove, rename, chown, link,
symlink, ...) that can be applied to any directory. Applying the same
operations to a mounted snapshot and to a plain reference directory, then
comparing the two trees with :func:`assert_same_tree`, checks that the
snapshotter stores and layers exactly what a plain filesystem would.

Paths in operations are relative to the directory they are applied to; a
leading ``/`` is allowed and means the same thing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from lamina.fs.files import remove_tree
from lamina.mounts.mountinfo import read_mountinfo

__all__ = [
    "Applier",
    "Chmod",
    "Chown",
    "CreateDir",
    "CreateFile",
    "Entry",
    "Link",
    "Mkfifo",
    "Mknod",
    "Op",
    "Remove",
    "Rename",
    "Symlink",
    "Tree",
    "apply",
    "assert_same_tree",
    "diff_trees",
    "mount_points_under",
    "reference_dir",
    "scan",
]


def _at(root: Path, path: str) -> Path:
    rel = path.lstrip("/")
    return root / rel if rel else root


class Op(Protocol):
    """One change to a directory tree."""

    def __call__(self, root: Path) -> None: ...


class _Make:
    """An operation that makes ``path`` owner-only, then gives it ``mode`` with
    chmod, so the mode is exactly ``mode`` whatever the umask."""

    path: str
    mode: int

    def __call__(self, root: Path) -> None:
        p = _at(root, self.path)
        self._make(p)
        os.chmod(p, self.mode)

    def _make(self, p: Path) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class CreateFile(_Make):
    """Write ``content`` to ``path`` (truncating an existing file), then set ``mode``."""

    path: str
    content: bytes
    mode: int = 0o644

    def _make(self, p: Path) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(self.content)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


@dataclass(frozen=True)
class CreateDir(_Make):
    """Make directory ``path`` (its parent must exist), then set ``mode``."""

    path: str
    mode: int = 0o755

    def _make(self, p: Path) -> None:
        os.mkdir(p, 0o700)


@dataclass(frozen=True)
class Remove:
    """Remove ``path`` and everything below it; a missing path is fine."""

    path: str

    def __call__(self, root: Path) -> None:
        p = _at(root, self.path)
        if p.is_dir() and not p.is_symlink():
            remove_tree(p)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


@dataclass(frozen=True)
class Rename:
    """Move ``old`` to ``new``, like ``mv``.

    rename(2) of a directory that comes from a lower overlayfs layer fails
    with EXDEV unless the mount redirects directories; ``mv`` then copies the
    tree and removes the source, and so does this operation.
    """

    old: str
    new: str

    def __call__(self, root: Path) -> None:
        src, dst = _at(root, self.old), _at(root, self.new)
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_tree(src, dst)
            Remove(self.old)(root)


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        for name in [".", *dirnames, *filenames]:
            s = os.path.normpath(os.path.join(dirpath, name))
            d = os.path.normpath(os.path.join(dst, rel, name))
            st = os.lstat(s)
            os.lchown(d, st.st_uid, st.st_gid)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(d, stat.S_IMODE(st.st_mode))


@dataclass(frozen=True)
class Chown:
    """Change the owner of ``path`` (not following a symlink)."""

    path: str
    uid: int
    gid: int

    def __call__(self, root: Path) -> None:
        os.lchown(_at(root, self.path), self.uid, self.gid)


@dataclass(frozen=True)
class Chmod:
    """Change the permission bits of ``path``."""

    path: str
    mode: int

    def __call__(self, root: Path) -> None:
        os.chmod(_at(root, self.path), self.mode)


@dataclass(frozen=True)
class Link:
    """Make ``new`` a hard link to ``old``."""

    old: str
    new: str

    def __call__(self, root: Path) -> None:
        os.link(_at(root, self.old), _at(root, self.new), follow_symlinks=False)


@dataclass(frozen=True)
class Symlink:
    """Make ``path`` a symbolic link pointing at ``target`` (stored verbatim)."""

    target: str
    path: str

    def __call__(self, root: Path) -> None:
        os.symlink(self.target, _at(root, self.path))


@dataclass(frozen=True)
class Mkfifo(_Make):
    """Make a named pipe at ``path``, then set ``mode``."""

    path: str
    mode: int = 0o644

    def _make(self, p: Path) -> None:
        os.mkfifo(p, 0o600)


@dataclass(frozen=True)
class Mknod(_Make):
    """Make a character device ``major:minor`` at ``path`` (needs CAP_MKNOD), then set ``mode``."""

    path: str
    major: int
    minor: int
    mode: int = 0o644

    def _make(self, p: Path) -> None:
        os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(self.major, self.minor))


class Applier:
    """An ordered list of operations; calling it applies them to a directory."""

    def __init__(self, ops: Iterable[Op]) -> None:
        self.ops: tuple[Op, ...] = tuple(ops)

    def __call__(self, root: str | os.PathLike[str]) -> None:
        root = Path(root)
        for op in self.ops:
            op(root)

    def __add__(self, other: Applier) -> Applier:
        return Applier((*self.ops, *other.ops))

    def __repr__(self) -> str:
        return f"Applier({list(self.ops)!r})"

    @property
    def chowns(self) -> bool:
        """Whether applying this changes owners (needs Capability.CHOWN)."""
        return any(isinstance(op, Chown) for op in self.ops)


def apply(*parts: Op | Applier) -> Applier:
    """One applier out of operations and other appliers, in order."""
    ops: list[Op] = []
    for part in parts:
        if isinstance(part, Applier):
            ops.extend(part.ops)
        else:
            ops.append(part)
    return Applier(ops)


def reference_dir(work: Path, *appliers: Applier) -> Path:
    """A fresh plain directory (mode 0755, like a snapshot root) with ``appliers`` applied."""
    d = Path(tempfile.mkdtemp(prefix="flat-", dir=work))
    os.chmod(d, 0o755)
    for a in appliers:
        a(d)
    return d


# -- comparison ---------------------------------------------------------------

_KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class Entry:
    """What the comparison looks at for one path."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None = None  # regular files
    sha256: str | None = None  # regular files
    target: str | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # devices

    def describe(self) -> str:
        parts = [self.kind, f"mode={self.mode:04o}", f"owner={self.uid}:{self.gid}"]
        if self.size is not None:
            parts.append(f"size={self.size}")
        if self.sha256 is not None:
            parts.append(f"sha256={self.sha256[:12]}")
        if self.target is not None:
            parts.append(f"-> {self.target!r}")
        if self.rdev is not None:
            parts.append(f"dev={self.rdev[0]}:{self.rdev[1]}")
        return " ".join(parts)


@dataclass(frozen=True)
class Tree:
    """Every path below a root ("/" is the root itself) and the hard-link groups."""

    entries: dict[str, Entry]
    links: frozenset[tuple[str, ...]]


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry(path: str, st: os.stat_result) -> Entry:
    fmt = stat.S_IFMT(st.st_mode)
    kind = _KINDS.get(fmt, f"type-{fmt:o}")
    e = Entry(kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    if fmt == stat.S_IFREG:
        return replace(e, size=st.st_size, sha256=_digest(path))
    if fmt == stat.S_IFLNK:
        return replace(e, target=os.readlink(path))
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        return replace(e, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
    return e


def _walk(root: str) -> Iterator[tuple[str, str, os.stat_result]]:
    yield "/", root, os.lstat(root)
    stack = [("", root)]
    while stack:
        rel, real = stack.pop()
        with os.scandir(real) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                r = f"{rel}/{entry.name}"
                yield r, entry.path, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append((r, entry.path))


def scan(root: str | os.PathLike[str]) -> Tree:
    """Read the tree below ``root`` (not following symlinks)."""
    entries: dict[str, Entry] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for rel, real, st in _walk(os.fspath(root)):
        entries[rel] = _entry(real, st)
        if not stat.S_ISDIR(st.st_mode):
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    links = frozenset(tuple(sorted(g)) for g in inodes.values() if len(g) > 1)
    return Tree(entries, links)


def diff_trees(
    actual: Tree, expected: Tree, *, hardlinks: bool = True, owners: bool = True
) -> list[str]:
    """Human-readable differences; empty when the trees are the same."""
    out: list[str] = []
    for path in sorted(expected.entries.keys() | actual.entries.keys()):
        a, e = actual.entries.get(path), expected.entries.get(path)
        if a is None:
            assert e is not None
            out.append(f"missing {path} ({e.describe()})")
        elif e is None:
            out.append(f"unexpected {path} ({a.describe()})")
        else:
            if not owners:
                a = replace(a, uid=e.uid, gid=e.gid)
            if a != e:
                out.append(f"{path}: got {a.describe()}, want {e.describe()}")
    if hardlinks and actual.links != expected.links:
        out.append(
            f"hard links: got {sorted(actual.links)}, want {sorted(expected.links)}"
        )
    return out


def assert_same_tree(
    actual: str | os.PathLike[str],
    expected: str | os.PathLike[str],
    *,
    hardlinks: bool = True,
    owners: bool = True,
) -> None:
    """AssertionError listing the differences when the two trees differ."""
    problems = diff_trees(scan(actual), scan(expected), hardlinks=hardlinks, owners=owners)
    if problems:
        shown = problems[:40] + ([f"... {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise AssertionError(
            f"tree {os.fspath(actual)} differs from {os.fspath(expected)}:\n  "
            + "\n  ".join(shown)
        )


def mount_points_under(base: str | os.PathLike[str]) -> list[str]:
    """Mount points strictly below ``base``, deepest first."""
    prefix = os.path.realpath(base).rstrip("/") + "/"
    points = {m.mount_point for m in read_mountinfo() if m.mount_point.startswith(prefix)}
    return sorted(points, key=len, reverse=True)
