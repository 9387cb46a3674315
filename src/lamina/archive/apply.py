"""Apply (unpack) an OCI layer onto a directory.

:func:`apply_layer` streams a layer (plain tar, gzip or zstd: detected) onto
``root`` with OCI semantics, hashing the uncompressed stream as it goes to
produce the layer's DiffID.

Semantics, per member:

* ``.wh.<name>`` deletes ``<name>`` (recursively) from the directory;
  ``.wh..wh..opq`` removes everything in the directory (recursively) that this
  same layer did not put there. Other ``.wh..wh.*`` names (AUFS metadata) are
  ignored. A whiteout that is a directory, or a path *through* a ``.wh.``
  component, is rejected.
* A new entry replaces whatever non-directory is at its path; a non-directory
  replaces an existing directory by removing it recursively; a directory over
  an existing directory keeps its contents and takes the new metadata.
* Ownership is numeric; mode bits include setuid/setgid/sticky (chmod comes
  after chown, which clears them); PAX xattrs (``security.capability``
  included) are set after both; times have nanosecond precision, the access
  time being the later of the PAX atime and the mtime, as containerd does.
  Directory times are set last, after every member.
* Hard links must name an existing entry inside the root; symlink targets are
  stored verbatim (they are never followed). Sockets are skipped. xattrs
  named ``trusted.overlay.*`` are never applied from a layer, and xattrs the
  filesystem refuses (EOPNOTSUPP/EPERM) are skipped, as containerd does.

With ``overlay=True`` the root is an overlayfs upper directory being filled
while its lowers are not visible: a whiteout becomes a 0/0 character device,
an opaque marker becomes ``trusted.overlay.opaque=y`` on the directory, and
nothing below is deleted.

Safety: every path is resolved below ``root`` one component at a time with
``O_NOFOLLOW`` (see :mod:`lamina.archive.safepath`): nothing outside the root is
ever written. A symlinked parent directory is followed inside the root, as a
container would see it (absolute targets start at the root); names escaping
with ``..``, symlinked parents leading out of the root, hard links out of the
root or to missing targets are InvalidArgument. Bookkeeping (what this layer
made, directory times) uses resolved paths.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from lamina.archive.compression import open_decompressed
from lamina.archive.safepath import DirCache, clean_path
from lamina.archive.tarstream import (
    TYPE_BLOCK,
    TYPE_CHAR,
    TYPE_DIR,
    TYPE_FIFO,
    TYPE_HARDLINK,
    TYPE_REGULAR,
    TYPE_SYMLINK,
    TarEntry,
    TarReader,
)
from lamina.archive.whiteout import (
    OPAQUE_MARKER,
    OVERLAY_OPAQUE_XATTR,
    OVERLAY_XATTR_PREFIX,
    WHITEOUT_META_PREFIX,
    WHITEOUT_PREFIX,
    whiteout_target,
)
from lamina.errors import Internal, InvalidArgument, LaminaError, NotFound

__all__ = ["AppliedLayer", "NeedsLowerLayers", "apply_layer"]

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_IGNORED_XATTR_ERRNOS = (errno.EOPNOTSUPP, errno.EPERM)
_LAYER_ERRNOS = (errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EISDIR)


@dataclass(frozen=True)
class AppliedLayer:
    """What applying a layer produced.

    ``diff_id`` is ``sha256:<hex>`` of the whole uncompressed stream, ``size``
    its length in bytes.
    """

    diff_id: str
    size: int


class NeedsLowerLayers(InvalidArgument):
    """In overlay (upperdir-only) mode: the layer depends on lower layers' content.

    A parent directory the layer does not list (its metadata lives below) or
    a hard link to a file of a lower layer cannot be reproduced from the
    upperdir alone. Callers apply such a layer on a mounted snapshot instead.
    """


def _bad(msg: str) -> InvalidArgument:
    return InvalidArgument(f"invalid tar layer: {msg}")


def _remove(parent_fd: int, name: str) -> bool:
    """Remove ``name`` (recursively if a directory); True if a directory went."""
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent_fd)
        return True
    os.unlink(name, dir_fd=parent_fd)
    return False


class _Applier:
    def __init__(self, root_fd: int, overlay: bool) -> None:
        self.root_fd = root_fd
        self.overlay = overlay
        self.touched: set[str] = set()
        self.dirs = DirCache(root_fd, self._implicit_dir)
        self.link_dirs = DirCache(root_fd)
        self.dir_times: dict[str, tuple[int, int]] = {}
        self.euid = os.geteuid()
        self.egid = os.getegid()

    def _implicit_dir(self, rel: str) -> None:
        if self.overlay:
            raise NeedsLowerLayers(
                f"directory {rel!r} is not in the layer; its metadata is in lower layers")
        self.touched.add(rel)

    def close(self) -> None:
        self.dirs.close()
        self.link_dirs.close()

    # -- helpers ---------------------------------------------------------
    def _clear_existing(self, pfd: int, name: str) -> None:
        if _remove(pfd, name):
            self.link_dirs.clear()

    def _chown_needed(self, e: TarEntry) -> bool:
        return e.uid != self.euid or e.gid != self.egid or self.dirs.parent_setgid()

    def _set_xattrs_fd(self, fd: int, e: TarEntry) -> None:
        for key, value in e.xattrs.items():
            if key.startswith(OVERLAY_XATTR_PREFIX):
                continue
            try:
                os.setxattr(fd, key, value)
            except OSError as exc:
                if exc.errno not in _IGNORED_XATTR_ERRNOS:
                    raise

    def _set_xattrs_at(self, pfd: int, name: str, e: TarEntry) -> None:
        path = f"/proc/self/fd/{pfd}/{name}"
        for key, value in e.xattrs.items():
            if key.startswith(OVERLAY_XATTR_PREFIX):
                continue
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _IGNORED_XATTR_ERRNOS:
                    raise

    @staticmethod
    def _times(e: TarEntry) -> tuple[int, int]:
        atime = e.atime_ns if e.atime_ns is not None and e.atime_ns > e.mtime_ns else e.mtime_ns
        return atime, e.mtime_ns

    # -- members ---------------------------------------------------------
    def entry(self, e: TarEntry, reader: TarReader) -> None:
        parts = clean_path(e.name)
        if not parts:
            if e.type != TYPE_DIR:
                raise _bad(f"{e.name!r}: only a directory can name the root")
            self._dir_meta(self.root_fd, e)
            self.dir_times[""] = self._times(e)
            return
        for comp in parts[:-1]:
            if comp.startswith(WHITEOUT_PREFIX):
                raise _bad(f"{e.name!r}: path goes through whiteout {comp!r}")
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(e, parts)
            return
        if e.is_socket:
            return
        pfd = self.dirs.get(parts[:-1], create=True)
        assert pfd is not None
        parts = [*self.dirs.path, base]  # symlinked parents resolved
        rel = "/".join(parts)
        t = e.type
        if t == TYPE_REGULAR:
            self._regular(pfd, base, e, reader)
        elif t == TYPE_DIR:
            self._directory(pfd, base, e)
            self.dir_times[rel] = self._times(e)
        elif t == TYPE_SYMLINK:
            self._symlink(pfd, base, e)
        elif t == TYPE_HARDLINK:
            self._hardlink(pfd, base, e, parts)
        elif t in (TYPE_CHAR, TYPE_BLOCK, TYPE_FIFO):
            self._node(pfd, base, e)
        else:  # pragma: no cover - the reader only yields the types above
            raise _bad(f"{e.name!r}: unsupported member type {t!r}")
        self.touched.add(rel)

    def _regular(self, pfd: int, name: str, e: TarEntry, reader: TarReader) -> None:
        try:
            fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._clear_existing(pfd, name)
            fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=pfd)
        try:
            write = os.write
            while reader.remaining:
                chunk = reader.read_data(_CHUNK)
                while chunk:
                    n = write(fd, chunk)
                    chunk = chunk[n:]
            if self._chown_needed(e):
                os.fchown(fd, e.uid, e.gid)
            os.fchmod(fd, e.mode)
            if e.xattrs:
                self._set_xattrs_fd(fd, e)
            os.utime(fd, ns=self._times(e))
        finally:
            os.close(fd)

    def _dir_meta(self, fd: int, e: TarEntry) -> None:
        os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode)
        if e.xattrs:
            self._set_xattrs_fd(fd, e)

    def _directory(self, pfd: int, name: str, e: TarEntry) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.lstat(name, dir_fd=pfd)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=pfd)
                os.mkdir(name, 0o700, dir_fd=pfd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            self._dir_meta(fd, e)
        finally:
            os.close(fd)

    def _symlink(self, pfd: int, name: str, e: TarEntry) -> None:
        try:
            os.symlink(e.linkname, name, dir_fd=pfd)
        except FileExistsError:
            self._clear_existing(pfd, name)
            os.symlink(e.linkname, name, dir_fd=pfd)
        if self._chown_needed(e):
            os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        if e.xattrs:
            self._set_xattrs_at(pfd, name, e)
        os.utime(name, ns=self._times(e), dir_fd=pfd, follow_symlinks=False)

    def _node(self, pfd: int, name: str, e: TarEntry) -> None:
        if e.type == TYPE_FIFO:
            kind, dev = stat.S_IFIFO, 0
        else:
            kind = stat.S_IFCHR if e.type == TYPE_CHAR else stat.S_IFBLK
            dev = os.makedev(e.devmajor, e.devminor)
        try:
            os.mknod(name, kind | 0o600, dev, dir_fd=pfd)
        except FileExistsError:
            self._clear_existing(pfd, name)
            os.mknod(name, kind | 0o600, dev, dir_fd=pfd)
        if self._chown_needed(e):
            os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        # a device node or fifo we just made: chmod cannot be redirected by it
        os.chmod(name, e.mode, dir_fd=pfd)
        if e.xattrs:
            self._set_xattrs_at(pfd, name, e)
        os.utime(name, ns=self._times(e), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, pfd: int, name: str, e: TarEntry, parts: list[str]) -> None:
        if not e.linkname:
            raise _bad(f"{e.name!r}: hard link without a target")
        try:
            target = clean_path(e.linkname)
        except InvalidArgument:
            raise _bad(f"{e.name!r}: hard link target {e.linkname!r} is outside the root") from None
        if not target:
            raise _bad(f"{e.name!r}: hard link to the root directory")
        if target == parts:
            return
        missing = NeedsLowerLayers if self.overlay else InvalidArgument
        tfd = self.link_dirs.get(target[:-1], create=False)
        if tfd is None:
            raise missing(f"invalid tar layer: {e.name!r}: hard link target "
                          f"{e.linkname!r} does not exist")
        tname = target[-1]
        if [*self.link_dirs.path, tname] == parts:
            return  # a link to itself through a symlinked parent
        try:
            tst = os.lstat(tname, dir_fd=tfd)
        except FileNotFoundError:
            raise missing(f"invalid tar layer: {e.name!r}: hard link target "
                          f"{e.linkname!r} does not exist") from None
        if stat.S_ISDIR(tst.st_mode):
            raise _bad(f"{e.name!r}: hard link target {e.linkname!r} is a directory")
        try:
            os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileExistsError:
            self._clear_existing(pfd, name)
            os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        # Like containerd: the link's own header sets the shared inode's metadata.
        if stat.S_ISLNK(tst.st_mode):
            if os.geteuid() == 0:
                os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
            return
        if self.euid == 0 and (tst.st_uid, tst.st_gid) != (e.uid, e.gid):
            os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        os.chmod(name, e.mode & 0o7777, dir_fd=pfd)
        if e.xattrs:
            self._set_xattrs_at(pfd, name, e)
        os.utime(name, ns=self._times(e), dir_fd=pfd, follow_symlinks=False)

    def _whiteout(self, e: TarEntry, parts: list[str]) -> None:
        base = parts[-1]
        if e.type == TYPE_DIR:
            raise _bad(f"{e.name!r}: a whiteout cannot be a directory")
        if base == OPAQUE_MARKER:
            self._opaque(parts[:-1])
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # AUFS metadata
        target = whiteout_target(base)
        pfd = self.dirs.get(parts[:-1], create=self.overlay)
        if pfd is None:
            return
        rel = "/".join([*self.dirs.path, target])
        if self.overlay:
            self._clear_existing(pfd, target)
            os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
        else:
            self._clear_existing(pfd, target)
        self.touched.discard(rel)
        self.dir_times.pop(rel, None)

    def _opaque(self, dparts: list[str]) -> None:
        pfd = self.dirs.get(dparts, create=self.overlay)
        if pfd is None:
            return
        if self.overlay:
            os.setxattr(pfd, OVERLAY_OPAQUE_XATTR, b"y")
            return
        prefix = "/".join(self.dirs.path)
        self._prune(pfd, prefix)

    def _prune(self, dfd: int, prefix: str) -> None:
        """Remove what this layer did not create below the directory ``dfd``."""
        for name in os.listdir(dfd):
            rel = f"{prefix}/{name}" if prefix else name
            if rel not in self.touched:
                self._clear_existing(dfd, name)
                continue
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            except OSError:
                continue  # not a directory
            try:
                self._prune(sub, rel)
            finally:
                os.close(sub)

    def finish_dirs(self) -> None:
        """Set the deferred directory times."""
        for rel in sorted(self.dir_times):
            atime, mtime = self.dir_times[rel]
            if not rel:
                os.utime(self.root_fd, ns=(atime, mtime))
                continue
            parts = rel.split("/")
            try:
                pfd = self.dirs.get(parts[:-1], create=False)
            except InvalidArgument:
                continue  # a parent was replaced by a non-directory later on
            if pfd is None:
                continue
            try:
                st = os.lstat(parts[-1], dir_fd=pfd)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                os.utime(parts[-1], ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)


def apply_layer(
    stream: IO[bytes],
    root: str | os.PathLike[str],
    *,
    overlay: bool = False,
    expected_diff_id: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> AppliedLayer:
    """Unpack the layer read from ``stream`` onto the directory ``root``.

    ``stream`` may be a plain, gzip or zstd tar stream (detected). It is read
    to its end and hashed: the result's ``diff_id`` covers every uncompressed
    byte, including any after the end-of-archive blocks. If
    ``expected_diff_id`` is given and differs, InvalidArgument is raised
    (after the layer was written: the caller discards the target).
    ``progress`` is called with the count of uncompressed bytes read so far.

    Malformed or hostile layers raise InvalidArgument; nothing is ever
    written outside ``root``. Filesystem failures raise Internal.
    """
    root = os.fspath(root)
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        raise NotFound(f"apply layer: target directory {root} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"apply layer: cannot open target {root}: {exc}") from exc
    digest = hashlib.sha256()
    if progress is None:
        on_bytes: Callable[[bytes], None] = digest.update
    else:
        counter = [0]
        cb = progress

        def on_bytes(data: bytes) -> None:
            digest.update(data)
            counter[0] += len(data)
            cb(counter[0])

    applier = _Applier(root_fd, overlay)
    current = ""
    try:
        with open_decompressed(stream) as plain:
            reader = TarReader(plain, on_bytes)
            try:
                while (e := reader.next()) is not None:
                    current = e.name
                    applier.entry(e, reader)
                current = ""
                reader.drain()
                applier.finish_dirs()
            except LaminaError:
                raise
            except OSError as exc:
                where = f" at {current!r}" if current else ""
                if exc.errno in _LAYER_ERRNOS:
                    raise _bad(f"cannot apply member{where}: {exc}") from exc
                raise Internal(f"apply layer{where}: {exc}") from exc
    finally:
        applier.close()
        os.close(root_fd)
    diff_id = "sha256:" + digest.hexdigest()
    if expected_diff_id is not None and expected_diff_id != diff_id:
        raise InvalidArgument(f"diff id mismatch: layer has {diff_id}, expected {expected_diff_id}")
    return AppliedLayer(diff_id=diff_id, size=reader.total)
