"""Create a layer from the difference between two trees.

:func:`write_diff` is the "double walk": it compares a lower tree with an
upper tree (typically the child snapshot, mounted) and writes a tar layer of
what changed: entries that are new or differ (type, mode, owner, size,
mtime, xattrs, link target, device number, or - when mtimes carry no
sub-second part and so cannot be trusted - content) as PAX members, and a
``.wh.<name>`` whiteout for each entry that disappeared. Opaque markers are
never written by the double walk: deleted entries get plain whiteouts. Every
parent directory of a written entry is written too (with its current
metadata), so applying the layer restores directory times exactly.

:func:`write_overlay_diff` reads an overlayfs upper directory alone: its
entries are the changes. 0/0 character devices become ``.wh.<name>``,
directories marked ``trusted.overlay.opaque=y`` get a ``.wh..wh..opq`` member
right after their own entry, and ``trusted.overlay.*`` xattrs are dropped.

Both compute first and write second, as umoci's layer generator does:
:func:`tree_changes` and :func:`overlay_changes` walk (with
:mod:`lamina.fs.walk`, in sorted order, parents before children) and yield
the changes, :func:`lamina.archive.layerwriter.write_layer` writes whatever
it is given. Files with several links become one file member and link
members for the other paths. Sockets are skipped.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator

from lamina.archive.compression import Compression, Sink
from lamina.archive.layerwriter import Change, DiffResult, Member, Whiteout, write_layer
from lamina.archive.whiteout import OPAQUE_MARKER, is_overlay_whiteout, whiteout_name
from lamina.errors import InvalidArgument, LaminaError, NotFound, while_doing
from lamina.fs.tree import DIR_FLAGS, proc_path
from lamina.fs.walk import PairedWalk, Walk, enter_present
from lamina.mounts.overlay import overlay_opaque_xattr, overlay_xattr_prefix

__all__ = ["DiffResult", "overlay_changes", "tree_changes", "write_diff", "write_overlay_diff"]

# not blocking: an entry listed as a file may be a FIFO by the time it is opened
_READ_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
               | getattr(os, "O_NOATIME", 0))
_CMP_CHUNK = 1 << 20

_At = tuple[int, str]  # an entry: its directory's fd and its name


class _Links:
    """The first path of each multiply-linked regular file, and whether it was written."""

    def __init__(self) -> None:
        self._first: dict[tuple[int, int], tuple[str, bool]] = {}

    def target(self, st: os.stat_result, rel: str, emit: bool) -> str | None:
        """For multiply-linked regular files: the first path of the inode, if any.

        Records ``rel`` as the first path otherwise; ``emit`` says whether it
        is being written.
        """
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return None
        key = (st.st_dev, st.st_ino)
        first = self._first.get(key)
        if first is None:
            self._first[key] = (rel, emit)
            return None
        return first[0]

    def first_emitted(self, st: os.stat_result) -> bool:
        first = self._first.get((st.st_dev, st.st_ino))
        return first is not None and first[1]


def _keep_xattrs(names: list[str], get: Callable[[str], bytes]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name in names:
        if name.startswith(overlay_xattr_prefix()):
            continue
        with contextlib.suppress(OSError):
            out[name] = get(name)
    return out


def _xattrs(at: _At) -> dict[str, bytes]:
    """The xattrs of entry ``at`` (not followed), ``trusted.overlay.*`` left out."""
    path = proc_path(*at)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return _keep_xattrs(names, lambda n: os.getxattr(path, n, follow_symlinks=False))


def _dir_xattrs(fd: int) -> dict[str, bytes]:
    """The xattrs of the open directory ``fd``, ``trusted.overlay.*`` left out."""
    try:
        names = os.listxattr(fd)
    except OSError:
        return {}
    return _keep_xattrs(names, lambda n: os.getxattr(fd, n))


def _same_content(a: _At, b: _At) -> bool:
    fa = os.open(a[1], _READ_FLAGS, dir_fd=a[0])
    try:
        fb = os.open(b[1], _READ_FLAGS, dir_fd=b[0])
        try:
            while True:
                ca = os.read(fa, _CMP_CHUNK)
                cb = os.read(fb, _CMP_CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _changed(lat: _At, lst: os.stat_result, uat: _At, ust: os.stat_result) -> bool:
    if stat.S_IFMT(lst.st_mode) != stat.S_IFMT(ust.st_mode):
        return True
    if (
        lst.st_mode != ust.st_mode
        or lst.st_uid != ust.st_uid
        or lst.st_gid != ust.st_gid
        or lst.st_mtime_ns != ust.st_mtime_ns
    ):
        return True
    mode = ust.st_mode
    if stat.S_ISREG(mode) and lst.st_size != ust.st_size:
        return True
    if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and lst.st_rdev != ust.st_rdev:
        return True
    if stat.S_ISLNK(mode) and (os.readlink(lat[1], dir_fd=lat[0])
                               != os.readlink(uat[1], dir_fd=uat[0])):
        return True
    if _xattrs(lat) != _xattrs(uat):
        return True
    return (
        stat.S_ISREG(mode)
        and ust.st_mtime_ns % 1_000_000_000 == 0
        and not _same_content(lat, uat)
    )


def _sibling(path: str, name: str, sibling: str) -> str:
    """``path`` (ending in ``name``) with ``sibling`` for its last component."""
    return path[: len(path) - len(name)] + sibling


class _Ancestor:
    """A directory on the way down, written only once something below it is."""

    __slots__ = ("emitted", "rel", "st", "xattrs")

    def __init__(self, rel: str, st: os.stat_result, xattrs: dict[str, bytes],
                 emitted: bool) -> None:
        self.rel = rel
        self.st = st
        self.xattrs = xattrs
        self.emitted = emitted


def _unwritten(ancestors: list[_Ancestor]) -> Iterator[Change]:
    for a in ancestors:
        if not a.emitted:
            yield Member(a.rel, a.st, None, a.xattrs)
            a.emitted = True


def tree_changes(lower_fd: int | None, upper_fd: int) -> Iterator[Change]:
    """What turns the tree below ``lower_fd`` (None: empty) into the one below
    ``upper_fd``: changed entries (with every unwritten parent directory first)
    and plain whiteouts for what the upper lacks. The roots are not changes."""
    root_mtime_ns = os.fstat(upper_fd).st_mtime_ns
    links = _Links()
    ancestors: list[_Ancestor] = []  # the directories entered above the current entry
    walk = PairedWalk(upper_fd, lower_fd)
    for p in walk:
        del ancestors[p.depth - 1:]
        ust = p.upper_stat
        if ust is None:
            yield from _unwritten(ancestors)
            parent_mtime_ns = ancestors[-1].st.st_mtime_ns if ancestors else root_mtime_ns
            yield Whiteout(_sibling(p.path, p.name, whiteout_name(p.name)), parent_mtime_ns)
            continue
        if stat.S_ISSOCK(ust.st_mode):
            continue
        uat = (p.upper, p.name)
        lst = p.lower_stat
        changed = lst is None or p.lower is None or _changed((p.lower, p.name), lst, uat, ust)
        target = links.target(ust, p.path, changed)
        if target is not None and (changed or links.first_emitted(ust)):
            yield from _unwritten(ancestors)
            yield Member(p.path, ust, uat, {}, link_to=target)
        elif changed:
            yield from _unwritten(ancestors)
            yield Member(p.path, ust, uat, _xattrs(uat))
        fd = enter_present(walk) if stat.S_ISDIR(ust.st_mode) else None
        if fd is not None:
            ancestors.append(_Ancestor(p.path, ust, _dir_xattrs(fd), changed))


def overlay_changes(upper_fd: int) -> Iterator[Change]:
    """The changes the overlayfs upper directory ``upper_fd`` stands for: its
    entries, whiteout devices as ``.wh.<name>``, an opaque directory's marker
    right after the directory (the root's first)."""
    mtimes = [os.fstat(upper_fd).st_mtime_ns]  # of the directories entered, root first
    if _is_opaque(upper_fd):
        yield Whiteout(OPAQUE_MARKER, mtimes[0])
    links = _Links()
    walk = Walk(upper_fd)
    for e in walk:
        del mtimes[e.depth:]
        st = e.stat
        if stat.S_ISSOCK(st.st_mode):
            continue
        if is_overlay_whiteout(st):
            yield Whiteout(_sibling(e.path, e.name, whiteout_name(e.name)), mtimes[-1])
            continue
        at = (e.parent, e.name)
        target = links.target(st, e.path, True)
        if target is not None:
            yield Member(e.path, st, at, {}, link_to=target)
            continue
        yield Member(e.path, st, at, _xattrs(at))
        fd = enter_present(walk) if stat.S_ISDIR(st.st_mode) else None
        if fd is None:
            continue
        mtimes.append(st.st_mtime_ns)
        if _is_opaque(fd):
            yield Whiteout(f"{e.path}/{OPAQUE_MARKER}", st.st_mtime_ns)


def _is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, overlay_opaque_xattr()) == b"y"
    except OSError:
        return False


def _check_dir(path: str, what: str) -> os.stat_result:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"diff: {what} {path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"diff: {what} {path} is not a directory")
    return st


@contextlib.contextmanager
def _opened(path: str | None) -> Iterator[int | None]:
    """The directory ``path`` opened (not following a symlink); None for None."""
    if path is None:
        yield None
        return
    fd = os.open(path, DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except LaminaError:
        raise
    except OSError as exc:
        raise while_doing(what, exc) from exc


def write_diff(
    lower: str | os.PathLike[str] | None,
    upper: str | os.PathLike[str],
    out: Sink,
    *,
    compression: str | Compression = "gzip",
) -> DiffResult:
    """Write the layer that turns ``lower`` into ``upper`` to ``out`` (double walk).

    ``lower`` None means an empty lower: every entry of ``upper`` is added.
    The roots themselves are not written. Returns the digests and sizes.
    """
    upper_s = os.fspath(upper)
    lower_s = os.fspath(lower) if lower is not None else None
    with _errors("diff"):
        _check_dir(upper_s, "upper")
        if lower_s is not None:
            _check_dir(lower_s, "lower")
        with _opened(upper_s) as ufd, _opened(lower_s) as lfd:
            assert ufd is not None
            return write_layer(tree_changes(lfd, ufd), out, compression=compression)


def write_overlay_diff(
    upperdir: str | os.PathLike[str],
    out: Sink,
    *,
    compression: str | Compression = "gzip",
) -> DiffResult:
    """Write the layer an overlayfs upper directory stands for to ``out``."""
    upper_s = os.fspath(upperdir)
    with _errors("overlay diff"):
        _check_dir(upper_s, "upperdir")
        with _opened(upper_s) as ufd:
            assert ufd is not None
            return write_layer(overlay_changes(ufd), out, compression=compression)
