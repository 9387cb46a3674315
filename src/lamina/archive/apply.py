"""Apply (unpack) an OCI layer onto a directory.

:func:`apply_layer` streams a layer (plain tar, gzip or zstd: detected) onto
``root`` with OCI semantics, hashing the uncompressed stream as it goes to
produce the layer's DiffID.

Semantics, per member:

* ``.wh.<name>`` hides ``<name>`` as the lower layers have it, and
  ``.wh..wh..opq`` hides everything the lower layers have in its directory.
  Whiteouts apply to lower layers only (OCI image spec, layer.md: "files that
  are present in the same layer as a whiteout file can only be hidden by
  whiteout files in subsequent layers"): what this same layer puts at or
  below the path stays, whether it comes before or after the whiteout. So
  ``f`` with ``.wh.f`` keeps this layer's ``f``, and ``d/x`` with ``.wh.d``
  (either order) leaves ``d`` holding this layer's entries only; a lower
  directory kept only as the parent of such entries looks as if the layer
  had created it implicitly (0755, the applier's owner, no xattrs). Other
  ``.wh..wh.*`` names (AUFS metadata) are ignored. A whiteout that is a
  directory, or a path *through* a ``.wh.`` component, is rejected.
* A character device 0/0 is rejected (InvalidArgument): it is overlayfs's
  whiteout, which no upper directory can hold as a device (and overlayfs
  refuses to create through a mount), so the tree would depend on the
  snapshotter. Deletions are ``.wh.`` names.
* A new entry replaces whatever non-directory is at its path; a non-directory
  replaces an existing directory by removing it recursively; a directory over
  an existing directory keeps its contents and takes the new metadata.
* Ownership always comes from the header (numeric): every entry is chowned,
  so a setgid directory (the root included) never lends its group. Mode bits
  include setuid/setgid/sticky (chmod comes after chown, which clears them);
  PAX xattrs (``security.capability`` included) are set after both; times
  have nanosecond precision, the access time being the later of the PAX atime
  and the mtime, as containerd does. Directory times are set last, after
  every member.
* Hard links must name an existing entry inside the root; symlink targets are
  stored verbatim (they are never followed). Sockets are skipped. xattrs
  named ``trusted.overlay.*`` are never applied from a layer, and xattrs the
  filesystem refuses (EOPNOTSUPP/EPERM) are skipped, as containerd does.

With ``overlay=True`` the root is an overlayfs upper directory being filled
while its lowers are not visible (staged extraction), and the same meaning is
written the way overlayfs reads it: a whiteout becomes a 0/0 character device
(or, over a directory this layer made, ``trusted.overlay.opaque=y``; over
another entry of this layer, nothing); an opaque marker becomes
``trusted.overlay.opaque=y``; a directory replacing a whiteout or another
non-directory of this layer is made opaque, so the lower directory's entries
stay hidden. Nothing below is deleted. What an upper directory cannot express
raises :class:`NeedsLowerLayers`, and the caller applies the layer on a
mounted snapshot instead: an opaque marker at the root (overlayfs ignores an
opaque upper root), a parent directory the layer does not list, a hard link
to a lower file. Whether the layer set the root's metadata is reported
(:attr:`AppliedLayer.root_listed`): otherwise the root keeps the parent's.

Safety: every path is resolved below ``root`` one component at a time with
``O_NOFOLLOW`` (see :mod:`lamina.archive.safepath`): nothing outside the root is
ever written. A symlinked parent directory is followed inside the root, as a
container would see it (absolute targets start at the root); names escaping
with ``..``, symlinked parents leading out of the root, hard links out of the
root or to missing targets are InvalidArgument. Bookkeeping (what this layer
made, directory times) uses resolved paths.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from lamina.archive import limits, members
from lamina.archive.compression import open_decompressed
from lamina.archive.members import NeedsLowerLayers, bad_layer
from lamina.archive.safepath import DirCache
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
    show_name,
)
from lamina.archive.whiteout import (
    OPAQUE_MARKER,
    WHITEOUT_META_PREFIX,
    is_overlay_whiteout,
    whiteout_target,
)
from lamina.errors import (
    Internal,
    InvalidArgument,
    LaminaError,
    NotFound,
    ResourceExhausted,
    from_os_error,
)
from lamina.fs.remove import remove_tree_at
from lamina.fs.tree import DIR_FLAGS
from lamina.mounts.overlay import overlay_opaque_xattr, overlay_xattr_prefix
from lamina.rootless import check_member, report_left_out

__all__ = ["AppliedLayer", "NeedsLowerLayers", "apply_layer"]

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_IGNORED_XATTR_ERRNOS = (errno.EOPNOTSUPP, errno.EPERM)
_LAYER_ERRNOS = (errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.E2BIG,
                 errno.ERANGE)


@dataclass(frozen=True)
class AppliedLayer:
    """What applying a layer produced.

    ``diff_id`` is ``sha256:<hex>`` of the whole uncompressed stream, ``size``
    its length in bytes; ``root_listed`` tells whether the layer has an entry
    for the root directory (its metadata then replaces the parent's).
    ``whiteouts`` (overlay mode) are the paths where a whiteout device was
    made: see :func:`lamina.archive.whiteout.drop_needless_whiteouts`.
    """

    diff_id: str
    size: int
    root_listed: bool = False
    whiteouts: tuple[str, ...] = ()


def _remove(parent_fd: int, name: str) -> bool:
    """Remove ``name`` (recursively if a directory); True if a directory went."""
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        remove_tree_at(parent_fd, name)
        return True
    os.unlink(name, dir_fd=parent_fd)
    return False


class _Applier:
    def __init__(self, root_fd: int, overlay: bool) -> None:
        self.root_fd = root_fd
        self.overlay = overlay
        self.touched: set[str] = set()
        # lower directories holding entries of this layer (ancestors of ``touched``)
        self.holding: set[str] = set()
        self.root_listed = False
        self.whiteouts: set[str] = set()  # overlay mode: whiteout devices made
        self.linked_up: set[str] = set()  # lower names this layer hard-linked to
        self.dirs = DirCache(root_fd, self._implicit_dir)
        self.link_dirs = self.dirs.view()  # same cache, its own last result
        self.dir_times: dict[str, tuple[int, int]] = {}
        self.euid = os.geteuid()
        self.egid = os.getegid()

    def _implicit_dir(self, rel: str) -> None:
        if self.overlay:
            raise NeedsLowerLayers(
                f"directory {rel!r} is not in the layer; its metadata is in lower layers")
        self._made(rel)

    def _made(self, rel: str) -> None:
        """Record that this layer put an entry at ``rel`` (a resolved path)."""
        self.touched.add(rel)
        head = rel.rpartition("/")[0]
        while head and head not in self.holding:
            self.holding.add(head)
            head = head.rpartition("/")[0]

    def close(self) -> None:
        self.dirs.close()
        self.link_dirs.close()

    # -- helpers ---------------------------------------------------------
    def _clear_existing(self, pfd: int, name: str) -> None:
        self.dirs.forget(pfd, name)  # cached directories and symlinks at ``name`` go
        _remove(pfd, name)

    def _set_xattrs_fd(self, fd: int, e: TarEntry) -> None:
        self._set_xattrs(fd, e)

    def _set_xattrs_at(self, pfd: int, name: str, e: TarEntry) -> None:
        self._set_xattrs(f"/proc/self/fd/{pfd}/{name}", e)

    @staticmethod
    def _set_xattrs(target: int | str, e: TarEntry) -> None:
        """``e``'s xattrs on ``target`` (an fd, or a path not to follow); one the
        filesystem does not take is left out; one the kernel rejects (EINVAL: a
        ``security.capability`` of the wrong size, or on a directory) refuses
        the layer, as containerd's applier does."""
        for key, value in e.xattrs.items():
            if key.startswith(overlay_xattr_prefix()):
                continue
            try:
                os.setxattr(target, key, value, follow_symlinks=isinstance(target, int))
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise bad_layer(f"{e.name!r}: the kernel rejects xattr {key!r} "
                                    f"({len(value)}-byte value) on it") from exc
                if exc.errno not in _IGNORED_XATTR_ERRNOS:
                    raise

    @staticmethod
    def _times(e: TarEntry) -> tuple[int, int]:
        atime = e.atime_ns if e.atime_ns is not None and e.atime_ns > e.mtime_ns else e.mtime_ns
        return atime, e.mtime_ns

    # -- members ---------------------------------------------------------
    def entry(self, e: TarEntry, reader: TarReader) -> None:
        what, parts = members.classify(e)
        if what is members.Member.ROOT:
            self._dir_meta(self.root_fd, e, existed=True)
            self.dir_times[""] = self._times(e)
            self.root_listed = True
            return
        if what is members.Member.WHITEOUT:
            self._whiteout(e, parts)
            return
        if what is members.Member.SKIP:
            return
        base = parts[-1]
        pfd = self._dir(parts[:-1])
        parts = [*self.dirs.path, base]  # symlinked parents resolved
        if len(parts) > limits.MAX_DEPTH:
            raise bad_layer(f"{show_name(e.name)} is {len(parts)} directories deep "
                            f"(limit {limits.MAX_DEPTH})")
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
            raise bad_layer(f"{e.name!r}: unsupported member type {t!r}")
        self._made(rel)

    def _dir(self, dparts: list[str]) -> int:
        """The directory ``dparts``, created if missing (see :class:`DirCache`)."""
        with members.whited_out_parents(dparts, self._through_whiteout if self.overlay else None):
            pfd = self.dirs.get(dparts, create=True)
        assert pfd is not None
        return pfd

    def _through_whiteout(self, parts: list[str]) -> bool:
        """Overlay mode: whether a component of ``parts`` is a whiteout device
        (symlinks are not followed: only a plain path can meet one)."""
        fd = os.dup(self.root_fd)
        try:
            for comp in parts:
                try:
                    st = os.lstat(comp, dir_fd=fd)
                except OSError:
                    return False
                if is_overlay_whiteout(st):
                    return True
                if not stat.S_ISDIR(st.st_mode):
                    return False
                nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return False
        finally:
            os.close(fd)

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
            os.fchown(fd, e.uid, e.gid)
            os.fchmod(fd, e.mode)
            if e.xattrs:
                self._set_xattrs_fd(fd, e)
            os.utime(fd, ns=self._times(e))
        finally:
            os.close(fd)

    def _dir_meta(self, fd: int, e: TarEntry, *, existed: bool) -> None:
        os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode)
        if existed:
            # The entry is the directory's whole metadata (an upperdir holds
            # just that): xattrs it does not list go.
            self._drop_xattrs(fd, keep=e.xattrs)
        if e.xattrs:
            self._set_xattrs_fd(fd, e)

    @staticmethod
    def _drop_xattrs(fd: int, *, keep: dict[str, bytes]) -> None:
        for key in os.listxattr(fd):
            if key in keep or key.startswith((overlay_xattr_prefix(), "security.selinux")):
                continue
            try:
                os.removexattr(fd, key)
            except OSError as exc:
                if exc.errno not in (*_IGNORED_XATTR_ERRNOS, errno.ENODATA):
                    raise

    def _directory(self, pfd: int, name: str, e: TarEntry) -> None:
        replaced = existed = False
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.lstat(name, dir_fd=pfd)
            existed = stat.S_ISDIR(st.st_mode)
            if not existed:
                self._clear_existing(pfd, name)
                os.mkdir(name, 0o700, dir_fd=pfd)
                replaced = True
        fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
        try:
            if replaced and self.overlay:
                # In an upperdir, what was here (a whiteout, or a non-directory
                # of this layer) hid the lower directory: keep it hidden.
                os.setxattr(fd, overlay_opaque_xattr(), b"y")
            self._dir_meta(fd, e, existed=existed)
        finally:
            os.close(fd)

    def _symlink(self, pfd: int, name: str, e: TarEntry) -> None:
        if not e.linkname:
            raise bad_layer(f"{e.name!r}: symlink with an empty target")
        try:
            os.symlink(e.linkname, name, dir_fd=pfd)
        except FileExistsError:
            self._clear_existing(pfd, name)
            os.symlink(e.linkname, name, dir_fd=pfd)
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
        os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        # a device node or fifo we just made: chmod cannot be redirected by it
        os.chmod(name, e.mode, dir_fd=pfd)
        if e.xattrs:
            self._set_xattrs_at(pfd, name, e)
        os.utime(name, ns=self._times(e), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, pfd: int, name: str, e: TarEntry, parts: list[str]) -> None:
        target = members.link_target(e)
        if target == parts:
            return
        missing = NeedsLowerLayers if self.overlay else InvalidArgument
        check = self._through_whiteout if self.overlay else None
        with members.whited_out_parents(
                target[:-1], check, message=f"hard link target {e.linkname!r} was whited out"):
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
        if self.overlay and is_overlay_whiteout(tst):
            # whited out by this layer: what that leaves is the mounted view's business
            raise NeedsLowerLayers(f"hard link target {e.linkname!r} was whited out")
        if stat.S_ISDIR(tst.st_mode):
            raise bad_layer(f"{e.name!r}: hard link target {e.linkname!r} is a directory")
        trel = "/".join([*self.link_dirs.path, tname])
        if trel not in self.touched and trel not in self.linked_up:
            # A lower name: overlayfs copies that one name up before linking,
            # splitting it from the rest of its lower hard-link group; do the same.
            if tst.st_nlink > 1 and not self.overlay:
                self._copy_up(tfd, tname, tst)
            self.linked_up.add(trel)
        try:
            os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileExistsError:
            self._clear_existing(pfd, name)
            try:
                os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:  # the target was inside the directory it replaced
                raise bad_layer(f"{e.name!r}: hard link target {e.linkname!r} is inside "
                                f"the directory the link replaces") from None
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

    def _copy_up(self, dfd: int, name: str, st: os.stat_result) -> None:
        """Replace the lower entry ``name`` by a copy of its own (data, owner,
        mode, xattrs, times), out of its hard-link group."""
        tmp = WHITEOUT_META_PREFIX + "lamina-copy-up"  # no layer member can have this name
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        if stat.S_ISREG(st.st_mode):
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                dst = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=dfd)
                try:
                    while os.sendfile(dst, src, None, _CHUNK):
                        pass
                    os.fchown(dst, st.st_uid, st.st_gid)
                    os.fchmod(dst, stat.S_IMODE(st.st_mode))
                finally:
                    os.close(dst)
            finally:
                os.close(src)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=dfd), tmp, dir_fd=dfd)
            os.chown(tmp, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
        else:  # a device node or fifo
            os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dfd)
            os.chown(tmp, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
            os.chmod(tmp, stat.S_IMODE(st.st_mode), dir_fd=dfd)
        src_path, dst_path = f"/proc/self/fd/{dfd}/{name}", f"/proc/self/fd/{dfd}/{tmp}"
        for key in os.listxattr(src_path, follow_symlinks=False):
            if key.startswith(overlay_xattr_prefix()):
                continue
            try:
                os.setxattr(dst_path, key, os.getxattr(src_path, key, follow_symlinks=False),
                            follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _IGNORED_XATTR_ERRNOS:
                    raise
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def _whiteout(self, e: TarEntry, parts: list[str]) -> None:
        base = parts[-1]
        if e.type == TYPE_DIR:
            raise bad_layer(f"{e.name!r}: a whiteout cannot be a directory")
        if base == OPAQUE_MARKER:
            self._opaque(parts[:-1])
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # AUFS metadata
        target = whiteout_target(base)
        if self.overlay:
            # The upperdir holds only this layer: whatever is at ``target`` is ours.
            pfd = self._dir(parts[:-1])
            try:
                st = os.lstat(target, dir_fd=pfd)
            except FileNotFoundError:
                os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
                self.whiteouts.add("/".join([*self.dirs.path, target]))
                return
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(target, DIR_FLAGS, dir_fd=pfd)
                try:
                    os.setxattr(fd, overlay_opaque_xattr(), b"y")
                finally:
                    os.close(fd)
            return
        found = self.dirs.get(parts[:-1], create=False)
        if found is None:
            return
        rel = "/".join([*self.dirs.path, target])
        if rel in self.touched or rel in self.holding:
            self._hide_lower(found, target, rel)
        else:
            self._clear_existing(found, target)

    def _opaque(self, dparts: list[str]) -> None:
        if self.overlay:
            fd = self._dir(dparts)
            if not self.dirs.path:
                raise NeedsLowerLayers(
                    "opaque root directory: overlayfs ignores an opaque upper root")
            os.setxattr(fd, overlay_opaque_xattr(), b"y")
            return
        found = self.dirs.get(dparts, create=False)
        if found is not None:
            self._prune("/".join(self.dirs.path))

    def _hide_lower(self, pfd: int, name: str, rel: str) -> None:
        """``.wh.<name>`` where this layer has put entries at or below ``rel``:
        keep those, remove what the lower layers have there."""
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            return  # this layer's own non-directory
        if rel not in self.touched:
            self._as_implicit(pfd, name, rel)
        self._prune(rel)

    def _as_implicit(self, pfd: int, name: str, rel: str) -> None:
        """Give the lower directory ``name`` in ``pfd`` (kept as a parent of this
        layer's entries) the metadata of a directory this layer created implicitly."""
        fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
        try:
            pst = os.fstat(pfd)
            os.fchown(fd, self.euid, pst.st_gid if pst.st_mode & stat.S_ISGID else self.egid)
            os.fchmod(fd, 0o755)
            self._drop_xattrs(fd, keep={})
        finally:
            os.close(fd)
        self._made(rel)

    def _open_dir(self, rel: str) -> int | None:
        """An fd for the resolved directory ``rel``; None if it is not one."""
        fd = os.dup(self.root_fd)
        for comp in rel.split("/") if rel else ():
            try:
                nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
            finally:
                os.close(fd)
            fd = nfd
        return fd

    def _prune(self, top: str) -> None:
        """Remove what the lower layers have below the resolved directory
        ``top``: keep this layer's entries and the directories holding them."""
        todo = [top]
        while todo:
            prefix = todo.pop()
            dfd = self._open_dir(prefix)
            if dfd is None:
                continue
            try:
                for name in os.listdir(dfd):
                    rel = f"{prefix}/{name}" if prefix else name
                    if rel in self.touched:
                        todo.append(rel)  # ours; if a directory, lower entries may be in it
                    elif rel in self.holding:
                        self._as_implicit(dfd, name, rel)
                        todo.append(rel)
                    else:
                        self._clear_existing(dfd, name)
            finally:
                os.close(dfd)

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
    max_size: int | None = limits.DEFAULT_MAX_LAYER_SIZE,
) -> AppliedLayer:
    """Unpack the layer read from ``stream`` onto the directory ``root``.

    ``stream`` may be a plain, gzip or zstd tar stream (detected). It is read
    to its end and hashed: the result's ``diff_id`` covers every uncompressed
    byte, including any after the end-of-archive blocks. If
    ``expected_diff_id`` is given and differs, InvalidArgument is raised
    (after the layer was written: the caller discards the target).
    ``progress`` is called with the count of uncompressed bytes read so far.

    Malformed or hostile layers raise InvalidArgument; nothing is ever
    written outside ``root``. A layer expanding beyond ``max_size``
    uncompressed bytes (None: no cap), or a filesystem whose free space drops
    below its reserve (see :mod:`lamina.archive.limits`), raises
    ResourceExhausted as soon as it happens. Other filesystem failures raise
    Internal.
    """
    root = os.fspath(root)
    try:
        root_fd = os.open(root, DIR_FLAGS)
    except FileNotFoundError:
        raise NotFound(f"apply layer: target directory {root} does not exist") from None
    except OSError as exc:
        if isinstance(from_os_error(exc), ResourceExhausted):  # no descriptor left, say
            raise ResourceExhausted(f"apply layer: cannot open target {root}: {exc}") from exc
        raise InvalidArgument(f"apply layer: cannot open target {root}: {exc}") from exc
    try:
        space = limits.SpaceGuard(root_fd, root)
        space.check()
    except BaseException:
        os.close(root_fd)
        raise
    meter = limits.LayerMeter(space, progress)
    applier = _Applier(root_fd, overlay)
    left_out: list[str] = []
    current: TarEntry | None = None
    try:
        with open_decompressed(stream, max_size=max_size) as plain:
            reader = TarReader(plain, meter)
            try:
                while (e := reader.next()) is not None:
                    current = e
                    device = (e.devmajor, e.devminor) if e.type in (TYPE_CHAR, TYPE_BLOCK) \
                        else None
                    if check_member(show_name(e.name), uid=e.uid, gid=e.gid, device=device):
                        applier.entry(e, reader)
                    else:
                        left_out.append(show_name(e.name))
                current = None
                reader.drain()
                applier.finish_dirs()
            except LaminaError:
                raise
            except OSError as exc:
                name = show_name(current.name) if current else ""
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise space.explain(exc, name or root,
                                        bool(current and current.xattrs)) from exc
                where = f" at {name}" if name else ""
                if exc.errno in _LAYER_ERRNOS:
                    raise bad_layer(f"cannot apply member{where}: {exc}") from exc
                if isinstance(from_os_error(exc), ResourceExhausted):
                    raise ResourceExhausted(f"apply layer{where}: {exc}") from exc
                raise Internal(f"apply layer{where}: {exc}") from exc
    finally:
        applier.close()
        os.close(root_fd)
    diff_id = meter.verified(expected_diff_id)
    report_left_out(left_out)
    return AppliedLayer(diff_id=diff_id, size=reader.total, root_listed=applier.root_listed,
                        whiteouts=tuple(sorted(applier.whiteouts)))
