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

Both walk in sorted order, parents before children, with numeric owners and
nanosecond mtimes, so equal trees give byte-identical layers. Whiteouts are
empty regular files with mode 0, owner 0:0 and the parent's mtime. Sockets
are skipped. Files with several links become one file member and link
members for the other paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lamina.archive.compression import Compression, Sink, compressor
from lamina.archive.tarwriter import TarWriter
from lamina.archive.whiteout import (
    OPAQUE_MARKER,
    OVERLAY_OPAQUE_XATTR,
    OVERLAY_XATTR_PREFIX,
    is_overlay_whiteout,
    whiteout_name,
)
from lamina.errors import Internal, InvalidArgument, LaminaError, NotFound
from lamina.fs.tree import DIR_FLAGS, DirStack, proc_path

__all__ = ["DiffResult", "write_diff", "write_overlay_diff"]

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)
_CMP_CHUNK = 1 << 20

_At = tuple[int, str]  # an entry: its directory's fd and its name


@dataclass(frozen=True)
class DiffResult:
    """The layer written: ``digest``/``size`` of the (compressed) output,
    ``diff_id``/``uncompressed_size`` of the tar inside."""

    digest: str
    size: int
    diff_id: str
    uncompressed_size: int


class _HashingSink:
    """Counts and hashes what passes through to ``out``."""

    def __init__(self, out: Sink) -> None:
        self._out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes, /) -> int:
        self.digest.update(data)
        self.size += len(data)
        self._out.write(data)
        return len(data)

    def flush(self) -> None:
        self._out.flush()


class _Layer:
    """Tar writer → uncompressed hash → compressor → compressed hash → output."""

    def __init__(self, out: Sink, compression: str | Compression) -> None:
        self.compressed = _HashingSink(out)
        self.comp = compressor(compression, self.compressed)
        self.digest = hashlib.sha256()
        self.size = 0
        self.tar = TarWriter(self._write)
        self.links: dict[tuple[int, int], tuple[str, bool]] = {}

    def _write(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self.comp.write(data)

    def finish(self) -> DiffResult:
        self.tar.close()
        self.comp.close()
        return DiffResult(
            digest="sha256:" + self.compressed.digest.hexdigest(),
            size=self.compressed.size,
            diff_id="sha256:" + self.digest.hexdigest(),
            uncompressed_size=self.size,
        )

    # -- members ---------------------------------------------------------
    def whiteout(self, rel: str, parent_mtime_ns: int) -> None:
        self.tar.add(rel, "0", mode=0, uid=0, gid=0, mtime_ns=parent_mtime_ns)

    def entry(
        self,
        rel: str,
        at: _At | None,
        st: os.stat_result,
        xattrs: dict[str, bytes],
        *,
        link_to: str | None = None,
    ) -> None:
        """Write the entry ``at`` (lstat ``st``) as member ``rel``; as a hard link if ``link_to``.

        ``at`` (directory fd, name) is needed for file data and link targets;
        None will do for a directory.
        """
        mode = st.st_mode
        size = 0
        linkname = ""
        devmajor = devminor = 0
        fd: int | None = None
        if link_to is not None:
            typeflag, linkname = "1", link_to
        elif stat.S_ISREG(mode):
            typeflag, size = "0", st.st_size
        elif stat.S_ISDIR(mode):
            typeflag = "5"
        elif stat.S_ISLNK(mode):
            assert at is not None
            typeflag, linkname = "2", os.readlink(at[1], dir_fd=at[0])
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            typeflag = "3" if stat.S_ISCHR(mode) else "4"
            devmajor, devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            typeflag = "6"
        else:  # sockets and anything else cannot go into a layer
            return
        if size:
            assert at is not None
            fd = os.open(at[1], _READ_FLAGS, dir_fd=at[0])
        try:
            self.tar.add(
                rel,
                typeflag,
                mode=stat.S_IMODE(mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime_ns=st.st_mtime_ns,
                size=size,
                linkname=linkname,
                devmajor=devmajor,
                devminor=devminor,
                xattrs=xattrs,
                data_fd=fd,
            )
        finally:
            if fd is not None:
                os.close(fd)

    def link_target(self, st: os.stat_result, rel: str, emit: bool) -> str | None:
        """For multiply-linked regular files: the first path of the inode, if any.

        Records ``rel`` as the first path otherwise; ``emit`` says whether it
        is being written.
        """
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return None
        key = (st.st_dev, st.st_ino)
        first = self.links.get(key)
        if first is None:
            self.links[key] = (rel, emit)
            return None
        return first[0]

    def first_emitted(self, st: os.stat_result) -> bool:
        first = self.links.get((st.st_dev, st.st_ino))
        return first is not None and first[1]


def _keep_xattrs(names: list[str], get: Callable[[str], bytes]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name in names:
        if name.startswith(OVERLAY_XATTR_PREFIX):
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


def _lstat(at: _At) -> os.stat_result:
    return os.stat(at[1], dir_fd=at[0], follow_symlinks=False)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


class _Ancestor:
    """A directory on the way down, written only once something below it is."""

    __slots__ = ("emitted", "rel", "st", "xattrs")

    def __init__(self, rel: str, st: os.stat_result, xattrs: dict[str, bytes],
                 emitted: bool) -> None:
        self.rel = rel
        self.st = st
        self.xattrs = xattrs
        self.emitted = emitted


def _flush_parents(layer: _Layer, ancestors: list[_Ancestor]) -> None:
    for a in ancestors:
        if not a.emitted:
            layer.entry(a.rel, None, a.st, a.xattrs)
            a.emitted = True


class _Frame:
    """One directory of a walk: its member name, stat, and the names still to visit
    (sorted, last to visit first); for the double walk, the lower's names."""

    __slots__ = ("lnames", "lower", "rel", "st", "todo", "unames")

    def __init__(self, rel: str, st: os.stat_result, unames: list[str],
                 lnames: set[str] | None = None) -> None:
        self.rel = rel
        self.st = st
        self.unames = set(unames)
        self.lnames = lnames if lnames is not None else set()
        self.lower = lnames is not None
        self.todo = sorted(self.unames | self.lnames, reverse=True)


def _double_walk(layer: _Layer, lower_fd: int | None, upper_fd: int,
                 upper_st: os.stat_result) -> None:
    """Compare the trees below ``lower_fd`` (None: empty) and ``upper_fd``, depth first."""
    ups = DirStack(upper_fd)
    lows = DirStack(lower_fd) if lower_fd is not None else None
    ancestors: list[_Ancestor] = []
    frames = [_Frame("", upper_st, os.listdir(upper_fd),
                     set(os.listdir(lower_fd)) if lower_fd is not None else None)]
    try:
        while frames:
            f = frames[-1]
            if not f.todo:
                frames.pop()
                if frames:
                    ups.pop()
                    if f.lower:
                        assert lows is not None
                        lows.pop()
                    ancestors.pop()
                continue
            name = f.todo.pop()
            crel = _join(f.rel, name)
            if name not in f.unames:
                _flush_parents(layer, ancestors)
                layer.whiteout(_join(f.rel, whiteout_name(name)), f.st.st_mtime_ns)
                continue
            uat = (ups.fd, name)
            try:
                ust = _lstat(uat)
            except FileNotFoundError:
                continue
            if stat.S_ISSOCK(ust.st_mode):
                continue
            lst: os.stat_result | None = None
            lat: _At | None = None
            if name in f.lnames:
                assert lows is not None
                lat = (lows.fd, name)
                with contextlib.suppress(FileNotFoundError):
                    lst = _lstat(lat)
            changed = lst is None or lat is None or _changed(lat, lst, uat, ust)
            target = layer.link_target(ust, crel, changed)
            if target is not None and (changed or layer.first_emitted(ust)):
                _flush_parents(layer, ancestors)
                layer.entry(crel, uat, ust, {}, link_to=target)
            elif changed:
                _flush_parents(layer, ancestors)
                layer.entry(crel, uat, ust, _xattrs(uat))
            if not stat.S_ISDIR(ust.st_mode):
                continue
            try:
                ups.push(name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            lnames: set[str] | None = None
            if lst is not None and stat.S_ISDIR(lst.st_mode):
                assert lows is not None
                try:
                    lows.push(name)
                    lnames = set(os.listdir(lows.fd))
                except (FileNotFoundError, NotADirectoryError):
                    lnames = None
            ancestors.append(_Ancestor(crel, ust, _dir_xattrs(ups.fd), changed))
            frames.append(_Frame(crel, ust, os.listdir(ups.fd), lnames))
    finally:
        ups.close()
        if lows is not None:
            lows.close()


def _overlay_walk(layer: _Layer, upper_fd: int, upper_st: os.stat_result) -> None:
    """Write the entries below the overlayfs upper directory ``upper_fd``, depth first."""
    ups = DirStack(upper_fd)
    frames = [_Frame("", upper_st, os.listdir(upper_fd))]
    try:
        while frames:
            f = frames[-1]
            if not f.todo:
                frames.pop()
                if frames:
                    ups.pop()
                continue
            name = f.todo.pop()
            crel = _join(f.rel, name)
            at = (ups.fd, name)
            try:
                st = _lstat(at)
            except FileNotFoundError:
                continue
            if stat.S_ISSOCK(st.st_mode):
                continue
            if is_overlay_whiteout(st):
                layer.whiteout(_join(f.rel, whiteout_name(name)), f.st.st_mtime_ns)
                continue
            target = layer.link_target(st, crel, True)
            if target is not None:
                layer.entry(crel, at, st, {}, link_to=target)
                continue
            layer.entry(crel, at, st, _xattrs(at))
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                ups.push(name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if _is_opaque(ups.fd):
                layer.whiteout(_join(crel, OPAQUE_MARKER), st.st_mtime_ns)
            frames.append(_Frame(crel, st, os.listdir(ups.fd)))
    finally:
        ups.close()


def _is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OVERLAY_OPAQUE_XATTR) == b"y"
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
        raise Internal(f"{what}: {exc}") from exc


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
        layer = _Layer(out, compression)
        with _opened(upper_s) as ufd, _opened(lower_s) as lfd:
            assert ufd is not None
            _double_walk(layer, lfd, ufd, os.fstat(ufd))
        return layer.finish()


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
        layer = _Layer(out, compression)
        with _opened(upper_s) as ufd:
            assert ufd is not None
            ust = os.fstat(ufd)
            if _is_opaque(ufd):
                layer.whiteout(OPAQUE_MARKER, ust.st_mtime_ns)
            _overlay_walk(layer, ufd, ust)
        return layer.finish()
