"""Read an uncompressed EROFS image without mounting it: enough to list its
tree (for tests, ``check --deep`` and diffs) and read a file's bytes.

It reads what :mod:`lamina.erofs.writer` writes (FLAT_PLAIN and
FLAT_INLINE data, compact and extended inodes, inline and shared xattrs) and
refuses the rest with InvalidArgument (compressed or chunk-based files).
Every offset is checked against the image's size, so a damaged image is an
InvalidArgument, never a crash.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from lamina.erofs import format as F
from lamina.errors import InvalidArgument
from lamina.util.closing import Closing

__all__ = ["EntryInfo", "ErofsImage"]


@dataclass(frozen=True)
class EntryInfo:
    """One inode of the image, as ``stat`` and ``getxattr`` would show it."""

    nid: int
    mode: int  # S_IFMT | permission bits
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    rdev: int = 0  # (major, minor) packed as os.makedev
    xattrs: dict[str, bytes] = field(default_factory=dict)
    layout: int = 0
    shared_xattrs: int = 0  # how many of ``xattrs`` are in the shared area
    startblk: int = 0
    meta_end: int = 0  # byte offset just after the inode and its xattrs


def _bad(msg: str) -> InvalidArgument:
    return InvalidArgument(f"invalid EROFS image: {msg}")


class ErofsImage(Closing):
    """An EROFS image file, opened read-only (use as a context manager)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._size = os.fstat(self._fd).st_size
            sb = self._read(F.EROFS_SUPER_OFFSET, F.SUPER_BLOCK.size)
            (magic, _csum, _compat, blkszbits, _ext, root_nid, inos, epoch, fixed_nsec,
             _blocks, meta_blkaddr, xattr_blkaddr, *_rest) = F.SUPER_BLOCK.unpack(sb)
            if magic != F.EROFS_SUPER_MAGIC_V1:
                raise _bad(f"bad magic {magic:#x}")
            self.blksz = 1 << blkszbits
            self.root_nid = root_nid
            self.inos = inos
            self.epoch_ns = epoch * 1_000_000_000 + fixed_nsec
            self._meta = meta_blkaddr * self.blksz
            self.xattr_blkaddr = xattr_blkaddr  # shared xattrs (0: none)
            self._xattr = xattr_blkaddr * self.blksz
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        os.close(self._fd)


    def _read(self, off: int, n: int) -> bytes:
        if off < 0 or off + n > self._size:
            raise _bad(f"read of {n} bytes at {off} is outside the image ({self._size} bytes)")
        return os.pread(self._fd, n, off)

    # -- inodes ------------------------------------------------------------
    def inode(self, nid: int) -> EntryInfo:
        at = self._meta + nid * F.EROFS_ISLOTSIZE
        head = self._read(at, 2)
        fmt = int.from_bytes(head, "little")
        version = (fmt >> F.EROFS_I_VERSION_BIT) & 1
        layout = (fmt >> F.EROFS_I_DATALAYOUT_BIT) & 7
        if version == F.EROFS_INODE_LAYOUT_EXTENDED:
            (_f, icount, mode, _nb, size, i_u, _ino, uid, gid, secs, nsec, nlink,
             _r) = F.INODE_EXTENDED.unpack(self._read(at, 64))
            if secs >= 1 << 63:
                secs -= 1 << 64
            mtime = secs * 1_000_000_000 + nsec
            isize = 64
        else:
            (_f, icount, mode, nlink, size, _mt, i_u, _ino, uid, gid,
             _r2) = F.INODE_COMPACT.unpack(self._read(at, 32))
            mtime = self.epoch_ns
            isize = 32
        if layout not in (F.EROFS_INODE_FLAT_PLAIN, F.EROFS_INODE_FLAT_INLINE):
            raise _bad(f"nid {nid}: data layout {layout} is not supported by this reader")
        xsize = 12 + (icount - 1) * 4 if icount else 0
        xattrs, shared = self._xattrs(at + isize, xsize) if xsize else ({}, 0)
        rdev = 0
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = os.makedev((i_u >> 8) & 0xFFF, (i_u & 0xFF) | ((i_u >> 12) & 0xFFF00))
        return EntryInfo(nid, mode, uid, gid, size, mtime, nlink, rdev, xattrs, layout, shared,
                         i_u, at + isize + xsize)

    def _entry(self, at: int) -> tuple[str | None, bytes, int]:
        name_len, index, value_size = F.XATTR_ENTRY.unpack(self._read(at, 4))
        raw = self._read(at + 4, name_len + value_size)
        name = F.xattr_full_name(index, raw[:name_len])
        return name, raw[name_len:], F.xattr_entry_size(name_len, value_size)

    def _xattrs(self, at: int, xsize: int) -> tuple[dict[str, bytes], int]:
        _filter, shared, _r = F.XATTR_IBODY_HEADER.unpack(self._read(at, 12))
        out: dict[str, bytes] = {}
        ids = self._read(at + 12, 4 * shared)
        for k in range(shared):
            sid = int.from_bytes(ids[4 * k:4 * k + 4], "little")
            name, value, _ = self._entry(self._xattr + sid * 4)
            if name is not None:
                out[name] = value
        pos = at + 12 + 4 * shared
        end = at + xsize
        while pos < end:
            name, value, n = self._entry(pos)
            if name is not None:
                out[name] = value
            pos += n
        return out, shared

    # -- data --------------------------------------------------------------
    def read(self, info: EntryInfo, off: int = 0, n: int | None = None) -> bytes:
        """``n`` bytes (all by default) of the inode's data from ``off``."""
        end = info.size if n is None else min(info.size, off + n)
        out = []
        bs = self.blksz
        whole = info.size // bs if info.layout == F.EROFS_INODE_FLAT_INLINE \
            else (info.size + bs - 1) // bs
        while off < end:
            blk = off // bs
            if blk < whole:
                step = min(end, (blk + 1) * bs) - off
                out.append(self._read(info.startblk * bs + off, step))
            else:
                step = end - off
                out.append(self._read(info.meta_end + off - blk * bs, step))
            off += step
        return b"".join(out)

    def entries(self, info: EntryInfo) -> Iterator[tuple[str, int, int]]:
        """A directory's ``(name, nid, file_type)``, ``.`` and ``..`` included."""
        bs = self.blksz
        for start in range(0, info.size, bs):
            block = self.read(info, start, bs)
            if len(block) < F.DIRENT.size:
                raise _bad(f"nid {info.nid}: directory block too short")
            count = F.DIRENT.unpack_from(block)[1] // F.DIRENT.size
            if not count or count * F.DIRENT.size > len(block):
                raise _bad(f"nid {info.nid}: bad dirent table")
            ents = [F.DIRENT.unpack_from(block, k * F.DIRENT.size) for k in range(count)]
            for k, (nid, nameoff, ftype, _r) in enumerate(ents):
                stop = ents[k + 1][1] if k + 1 < count else len(block)
                name = block[nameoff:stop]
                if k + 1 == count:
                    name = name.split(b"\0", 1)[0]
                yield name.decode("utf-8", "surrogateescape"), nid, ftype

    def walk(self) -> Iterator[tuple[str, EntryInfo]]:
        """The root (as ``/``) and every path below it (``/a/b``), depth first."""
        todo = [("/", self.root_nid)]
        seen_dirs = {self.root_nid}
        while todo:
            path, nid = todo.pop()
            info = self.inode(nid)
            yield path, info
            if not stat.S_ISDIR(info.mode):
                continue
            for name, child, _ftype in self.entries(info):
                if name in (".", ".."):
                    continue
                cpath = f"{path.rstrip('/')}/{name}"
                if child in seen_dirs:
                    raise _bad(f"{cpath}: a directory listed twice")
                todo.append((cpath, child))
                if _ftype == F.EROFS_FT[stat.S_IFDIR]:
                    seen_dirs.add(child)
