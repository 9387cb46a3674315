"""The overlay snapshotter: each snapshot is one overlayfs layer.

``snapshots/<id>/fs`` is the layer (the upperdir while active, a lowerdir
once committed) and ``snapshots/<id>/work`` overlayfs's workdir. Mounts:

* active, no parent: a read-write bind mount of ``fs``;
* active with parents: overlay with ``upperdir``/``workdir`` and
  ``lowerdir`` listing the parents nearest first;
* view of one parent: a read-only bind mount of the parent's ``fs``;
* view of several: an overlay of lowerdirs only (read-only by nature);
* view of nothing: a read-only bind mount of its own empty ``fs``.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lamina.errors import Unavailable
from lamina.fs.files import remove_tree
from lamina.fs.perms import FILE_MODE, tighten
from lamina.mounts.mount import Mount, mount_all, unmount_all
from lamina.mounts.overlay import overlay_mount_options, overlay_xattr_prefix
from lamina.snapshots import Capability, Kind
from lamina.snapshots.directory import DirectorySnapshotter
from lamina.snapshots.storage import Snapshot

__all__ = ["OverlaySnapshotter", "check_overlay_support"]

_CHECKED = ".overlay-supported"


class OverlaySnapshotter(DirectorySnapshotter):
    """Snapshots as overlayfs layers (see module docs)."""

    # Not LINKED_COPY_UP: changing one name of a hard-link group that lives in
    # a lower layer copies only that name up, so the group splits (overlayfs).
    CAPABILITIES = frozenset({Capability.OVERLAY, Capability.HARDLINKS, Capability.DEEP_CHAINS})
    #: overlayfs stacks at most 500 lower layers (the kernel's OVL_MAX_STACK); a
    #: deeper mount fails with a bare EINVAL, so the snapshot is refused up front.
    MAX_DEPTH = 500

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        async_remove: bool = False,
        mount_options: Sequence[str] = (),
        ahead: int = 0,
    ) -> None:
        super().__init__(root, async_remove=async_remove, ahead=ahead)
        self._extra = (*overlay_mount_options(), *mount_options)
        if not (self.root / _CHECKED).exists():
            check_overlay_support(self.root)
            (self.root / _CHECKED).touch(mode=FILE_MODE)
        tighten(self.root / _CHECKED, FILE_MODE)

    def _fill(self, new_dir: Path, kind: Kind, parent_ids: Sequence[str]) -> None:
        fs = new_dir / "fs"
        if kind is Kind.ACTIVE:
            (new_dir / "work").mkdir(mode=0o700, exist_ok=True)
        if fs.exists():  # a staged layer: its root is what the layer made it
            return
        fs.mkdir(mode=0o755)
        if parent_ids:  # the merged root takes its attributes from the top layer
            top = self.fs_dir(parent_ids[0])
            st = os.stat(top)
            os.chown(fs, st.st_uid, st.st_gid)
            os.chmod(fs, stat.S_IMODE(st.st_mode))
            for key, value in _xattrs(top).items():  # as a native copy keeps them
                os.setxattr(fs, key, value)

    def _ahead_fits(self, kind: Kind, parent_ids: Sequence[str], made: Path) -> bool:
        """Also under parents whose top layer's root has what ``made``'s has (owner,
        mode, xattrs): changing ``made``'s would need a sync of its own."""
        if kind is not Kind.ACTIVE:
            return False
        return not parent_ids or _root_attrs(self.fs_dir(parent_ids[0])) == _root_attrs(
            made / "fs")

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        own = self._dirs / snap.id
        parents = snap.parent_ids
        if snap.kind is Kind.ACTIVE and not parents:
            return [Mount("bind", str(own / "fs"), options=("rw", "rbind"))]
        if snap.kind is Kind.VIEW and len(parents) <= 1:
            src = self.fs_dir(parents[0]) if parents else own / "fs"
            return [Mount("bind", str(src), options=("ro", "rbind"))]
        lower = "lowerdir=" + ":".join(str(self.fs_dir(p)) for p in parents)
        if snap.kind is Kind.VIEW:
            return [Mount("overlay", "overlay", options=(*self._extra, lower))]
        return [
            Mount(
                "overlay",
                "overlay",
                options=(
                    *self._extra,
                    f"workdir={own / 'work'}",
                    f"upperdir={own / 'fs'}",
                    lower,
                ),
            )
        ]


def _xattrs(path: Path) -> dict[str, bytes]:
    """The extended attributes of ``path`` a layer's root passes on (not overlay's own)."""
    return {key: os.getxattr(path, key) for key in os.listxattr(path)
            if not key.startswith(overlay_xattr_prefix())}


def _root_attrs(path: Path) -> tuple[int, int, int, dict[str, bytes]]:
    """What a new layer's root takes from the top layer's: owner, mode, xattrs."""
    st = os.stat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), _xattrs(path)


def _supports_d_type(directory: Path) -> bool:
    """Whether the filesystem reports entry types in getdents (overlay needs it)."""
    probe = directory / "d_type-probe"
    probe.touch()
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = ctypes.create_string_buffer(65536)
        n = libc.syscall(217, fd, buf, len(buf))  # getdents64
        if n < 0:
            return False
        data, off = buf.raw[:n], 0
        while off < n:
            _ino, _off, reclen, dtype = struct.unpack_from("<QqHB", data, off)
            name = data[off + 19 : off + reclen].split(b"\0", 1)[0]
            if name == b"d_type-probe":
                return bool(dtype != 0)  # DT_UNKNOWN
            off += reclen
        return False
    finally:
        os.close(fd)
        probe.unlink()


def check_overlay_support(root: Path) -> None:
    """Mount a tiny overlay under ``root``; Unavailable with the reason if it fails."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="overlay-check-", dir=root))
    try:
        if not _supports_d_type(tmp):
            raise Unavailable(
                f"the filesystem under {root} does not support d_type; "
                "overlayfs needs it (xfs must be formatted with ftype=1)"
            )
        for d in ("lower", "upper", "work", "merged"):
            (tmp / d).mkdir()
        options = (*overlay_mount_options(), f"lowerdir={tmp / 'lower'}",
                   f"upperdir={tmp / 'upper'}", f"workdir={tmp / 'work'}")
        # volatile: unmounting a writable overlay syncs its whole upper filesystem
        # (every other writer's dirty data, tens of ms while layers download), and
        # nothing in the probe needs to last. Kernels before 5.10 refuse the option.
        try:
            mount_all([Mount("overlay", "overlay", options=(*options, "volatile"))],
                      tmp / "merged")
        except Exception:
            try:
                mount_all([Mount("overlay", "overlay", options=options)], tmp / "merged")
            except Exception as exc:
                raise Unavailable(f"overlayfs cannot be mounted under {root}: {exc}") from exc
        unmount_all(tmp / "merged")
    finally:
        remove_tree(tmp)
