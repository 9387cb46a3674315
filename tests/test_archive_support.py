"""Helpers shared by the archive tests (no tests here).

Layers are built with the standard library's tarfile (only for building),
compressed with gzip/zstd, and trees are captured entry by entry with every
piece of metadata lamina promises to preserve.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
import tarfile
from collections.abc import Iterable
from typing import Any

import zstandard

from lamina.archive.apply import apply_layer

__all__ = [
    "CAP_NET_BIND",
    "Member",
    "apply_bytes",
    "compress",
    "dev",
    "dir_",
    "fifo",
    "file_",
    "find_header",
    "hardlink",
    "make_tar",
    "set_field",
    "symlink",
    "tree_state",
]

# security.capability, VFS_CAP_REVISION_2 with CAP_NET_BIND_SERVICE effective+permitted
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)

Member = tuple[tarfile.TarInfo, bytes | None]


def _info(
    name: str, kind: bytes, mode: int, uid: int, gid: int, mtime: str | int
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid = uid
    ti.gid = gid
    ti.uname = ti.gname = ""
    if isinstance(mtime, str):
        ti.mtime = int(mtime.split(".")[0])
        ti.pax_headers = {"mtime": mtime}
    else:
        ti.mtime = mtime
    return ti


def _xattrs(ti: tarfile.TarInfo, xattrs: dict[str, bytes] | None) -> None:
    if xattrs:
        hdrs = dict(ti.pax_headers)
        for k, v in xattrs.items():
            hdrs["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
        ti.pax_headers = hdrs


def file_(
    name: str,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: str | int = 1_600_000_000,
    xattrs: dict[str, bytes] | None = None,
) -> Member:
    ti = _info(name, tarfile.REGTYPE, mode, uid, gid, mtime)
    ti.size = len(data)
    _xattrs(ti, xattrs)
    return ti, data


def dir_(
    name: str,
    *,
    mode: int = 0o755,
    uid: int = 0,
    gid: int = 0,
    mtime: str | int = 1_600_000_000,
    xattrs: dict[str, bytes] | None = None,
) -> Member:
    ti = _info(name, tarfile.DIRTYPE, mode, uid, gid, mtime)
    _xattrs(ti, xattrs)
    return ti, None


def symlink(
    name: str, target: str, *, uid: int = 0, gid: int = 0, mtime: str | int = 1_600_000_000
) -> Member:
    ti = _info(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime)
    ti.linkname = target
    return ti, None


def hardlink(name: str, target: str, *, mode: int = 0o644, uid: int = 0, gid: int = 0,
             mtime: int | str = 1_600_000_000) -> Member:
    """A link entry; like real tar writers, give it the target inode's metadata
    (appliers, containerd's included, apply the link header to the inode)."""
    ti = _info(name, tarfile.LNKTYPE, mode, uid, gid, mtime)
    ti.linkname = target
    return ti, None


def dev(
    name: str,
    major: int,
    minor: int,
    *,
    block: bool = False,
    mode: int = 0o600,
    uid: int = 0,
    gid: int = 0,
    mtime: str | int = 1_600_000_000,
) -> Member:
    ti = _info(name, tarfile.BLKTYPE if block else tarfile.CHRTYPE, mode, uid, gid, mtime)
    ti.devmajor = major
    ti.devminor = minor
    return ti, None


def fifo(name: str, *, mode: int = 0o640, mtime: str | int = 1_600_000_000) -> Member:
    return _info(name, tarfile.FIFOTYPE, mode, 0, 0, mtime), None


def make_tar(members: Iterable[Member], *, eoa: bool = True) -> bytes:
    """A PAX tar of ``members``; without the end-of-archive blocks if not ``eoa``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        end = buf.tell()
    raw = buf.getvalue()
    return raw if eoa else raw[:end]


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def apply_bytes(data: bytes, root: str | os.PathLike[str], **kw: Any) -> Any:
    return apply_layer(io.BytesIO(data), root, **kw)


def _read_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    out = []
    for name in os.listxattr(path, follow_symlinks=False):
        if name.startswith("trusted.overlay."):
            continue
        out.append((name, os.getxattr(path, name, follow_symlinks=False)))
    return tuple(sorted(out))


def tree_state(root: str | os.PathLike[str], *, times: bool = True) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root`` (not root itself) with its full metadata.

    Hard links show up as the sorted tuple of all paths (in the tree) sharing the inode.
    """
    root = os.fspath(root)
    entries: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            entries[os.path.relpath(p, root)] = os.lstat(p)
    by_inode: dict[tuple[int, int], list[str]] = {}
    for rel, st in entries.items():
        if not stat.S_ISDIR(st.st_mode):
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
    state: dict[str, tuple[Any, ...]] = {}
    for rel, st in entries.items():
        p = os.path.join(root, rel)
        mode = st.st_mode
        content: Any = None
        if stat.S_ISREG(mode):
            with open(p, "rb") as f:
                content = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(mode):
            content = os.readlink(p)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            content = (os.major(st.st_rdev), os.minor(st.st_rdev))
        group = by_inode.get((st.st_dev, st.st_ino), [])
        links = tuple(sorted(group)) if len(group) > 1 else ()
        mtime = st.st_mtime_ns if times else None
        state[rel] = (
            stat.S_IFMT(mode),
            stat.S_IMODE(mode),
            st.st_uid,
            st.st_gid,
            mtime,
            content,
            _read_xattrs(p),
            links,
        )
    return state


def set_field(raw: bytes, header_at: int, start: int, end: int, value: bytes) -> bytes:
    """Overwrite bytes ``start:end`` of the header at ``header_at``; fix its checksum."""
    block = bytearray(raw[header_at : header_at + 512])
    block[start:end] = value.ljust(end - start, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return raw[:header_at] + bytes(block) + raw[header_at + 512 :]


def find_header(raw: bytes, name: bytes) -> int:
    """Offset of the (last) header block whose name field is ``name``."""
    at = -1
    for off in range(0, len(raw), 512):
        if raw[off : off + 100].rstrip(b"\0") == name:
            at = off
    assert at >= 0, name
    return at
