"""Lay out and write the metadata of an EROFS image from a :class:`LayerTree`.

The image is written in this order (block numbers grow to the right)::

    block 0           superblock at byte 1024
    data area         regular files' whole blocks, streamed by the writer
    shared xattrs     from ``xattr_blkaddr``: each xattr two or more inodes
                      carry, stored once
    metadata area     from ``meta_blkaddr``: inodes (32-byte slots), each
                      followed by its inline xattrs and its tail (FLAT_INLINE)
    block area        directory blocks, and tails that did not fit inline

Inodes are laid out breadth first, the root first (its nid must fit the
superblock's 16 bits), each into the fullest metadata block with room for
it. An inode is compact where its fields fit and its mtime is the image's
epoch (the most common mtime of the layer), extended otherwise. A tail goes
inline when inode, xattrs and tail fit one block; otherwise the file is
FLAT_PLAIN and its tail gets a block of its own, right after its whole blocks
(a regular file's whole blocks are then copied next to it: only files with
several KiB of xattrs get there).

Memory: per inode a record of a few numbers; directory blocks and inline
tails are made one at a time and written in 1 MiB batches.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter, itemgetter

from lamina.erofs import format as F
from lamina.erofs.inode import Inode
from lamina.errors import InvalidArgument

__all__ = ["ImageLayout", "inline_room", "write_metadata"]

BLK = F.EROFS_BLKSIZ
_FLUSH = 1 << 20
_DIR, _REG, _LNK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
_DEVICES = (stat.S_IFCHR, stat.S_IFBLK)
_REG_LNK, _DIR_LNK = (_REG, _LNK), (_DIR, _LNK)
_DIRENT = F.DIRENT.size
_SLOT = F.EROFS_ISLOTSIZE
_ZERO16 = bytes(16)
#: i_format by (extended, inline)
_FORMATS = {
    (extended, inline): F.i_format(
        F.EROFS_INODE_LAYOUT_EXTENDED if extended else F.EROFS_INODE_LAYOUT_COMPACT,
        F.EROFS_INODE_FLAT_INLINE if inline else F.EROFS_INODE_FLAT_PLAIN)
    for extended in (False, True) for inline in (False, True)
}


@dataclass(frozen=True)
class ImageLayout:
    """What :func:`write_metadata` wrote: the inode count, the root's nid,
    the image's size in blocks and its epoch (compact inodes' time)."""

    inodes: int
    root_nid: int
    blocks: int
    epoch_ns: int


class _Rec:
    """Layout of one inode."""

    __slots__ = ("blkaddr", "dirblocks", "extended", "fmt", "inline", "nid", "nlink", "node",
                 "size", "tail", "xattr")

    # the other fields are set as the layout goes (write_metadata, phase by phase)
    nid: int
    size: int
    tail: int  # bytes of the last partial block
    inline: bool
    extended: bool
    fmt: int
    xattr: bytes
    dirblocks: list[int]  # entries per directory block (directories only)

    def __init__(self, node: Inode) -> None:
        self.node = node
        self.nlink = 0
        self.blkaddr = 0


def _xattr_entry(key: str, value: bytes) -> bytes:
    """One xattr entry, padded to 4 bytes."""
    split = F.split_xattr_name(key)
    if split is None:  # pragma: no cover - the tree keeps only storable names
        raise InvalidArgument(f"invalid tar layer: xattr {key!r} has no EROFS name prefix")
    index, suffix = split
    if len(value) > 0xFFFF or len(suffix) > 0xFF:
        raise InvalidArgument(f"invalid tar layer: xattr {key!r} ({len(value)}-byte "
                              "value) is too large for an EROFS image (65535 bytes)")
    entry = F.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return entry + bytes(-len(entry) % 4)


class _SharedXattrs:
    """The shared xattr area: an xattr (name and value) that two or more
    inodes carry is stored once, from block ``xattr_blkaddr``, and each inode
    lists its id (the entry's offset in 4-byte units); no entry crosses a
    block. An inode lists at most 255 (``h_shared_count`` is a byte)."""

    def __init__(self, nodes: list[Inode]) -> None:
        counts = Counter(pair for n in nodes if n.xattrs for pair in n.xattrs.items())
        self.ids: dict[tuple[str, bytes], int] = {}
        parts: list[bytes] = []
        pos = 0
        for pair, count in counts.items():
            if count < 2:
                continue
            entry = _xattr_entry(*pair)
            if pos % BLK + len(entry) > BLK and len(entry) <= BLK:
                parts.append(bytes(-pos % BLK))
                pos += -pos % BLK
            self.ids[pair] = pos // 4
            parts.append(entry)
            pos += len(entry)
        self.area = b"".join(parts)
        self.blocks = -(-pos // BLK)

    def body(self, node: Inode) -> bytes:
        """The inode's xattr ibody: header, shared ids, inline entries."""
        if not node.xattrs:
            return b""
        ids: list[int] = []
        inline: list[bytes] = []
        for key, value in node.xattrs.items():
            sid = self.ids.get((key, value))
            if sid is not None and len(ids) < 0xFF:
                ids.append(sid)
            else:
                inline.append(_xattr_entry(key, value))
        return _ibody(ids, inline)


def _ibody(ids: list[int], inline: list[bytes]) -> bytes:
    head = F.XATTR_IBODY_HEADER.pack(0, len(ids), bytes(7))
    body = head + b"".join(i.to_bytes(4, "little") for i in ids) + b"".join(inline)
    if (len(body) - 12) // 4 + 1 > 0xFFFF:
        raise InvalidArgument("invalid tar layer: the xattrs of one file take "
                              f"{len(body)} bytes, more than an EROFS inode holds")
    return body


def inline_room(node: Inode) -> int:
    """The largest tail that surely fits inline after the inode (extended, the
    larger form) and its xattrs as they are now."""
    xattrs = 12 if node.xattrs else 0
    for key, value in node.xattrs.items():
        xattrs += F.xattr_entry_size(len(key.encode("utf-8", "surrogateescape")), len(value))
    return BLK - 64 - xattrs


def _dir_entries(node: Inode, parent: Inode) -> list[tuple[bytes, Inode]]:
    children = node.children
    assert children is not None
    # one encode for all names (a name holds no NUL): per-name calls cost more
    names = "\0".join(children).encode("utf-8", "surrogateescape").split(b"\0")
    ents = list(zip(names, children.values(), strict=True)) if children else []
    ents.append((b".", node))
    ents.append((b"..", parent))
    ents.sort(key=itemgetter(0))
    return ents


def _pack_dir(ents: list[tuple[bytes, Inode]]) -> tuple[list[int], int]:
    """Entries per directory block, and the directory's size in bytes."""
    size = _DIRENT * len(ents) + sum([len(name) for name, _ in ents])
    if size <= BLK:  # most directories: one block
        return [len(ents)], size
    counts: list[int] = []
    used = count = 0
    for name, _ in ents:
        need = _DIRENT + len(name)
        if used + need > BLK:
            counts.append(count)
            used = count = 0
        used += need
        count += 1
    counts.append(count)
    return counts, (len(counts) - 1) * BLK + used


class _Slots:
    """Places inodes in the metadata area, 32-byte slots at a time. An inode
    (with its xattrs and inline tail) that fits a block goes into the fullest
    block with room for it (best fit), so the gaps that tails leave at block
    ends take the small inodes; a larger one starts a block of its own. Slot 0
    stays unused: an inode number of 0 is how readdir(3) marks a deleted entry,
    so the root (placed first) would vanish from listings."""

    PER_BLOCK = BLK // F.EROFS_ISLOTSIZE

    def __init__(self) -> None:
        self.used = [1]  # slots taken in each block
        self.free: list[list[int]] = [[] for _ in range(self.PER_BLOCK + 1)]
        self.rooms = 0  # bit r set: free[r] is not empty (found without a scan)
        self._free(self.PER_BLOCK - 1, 0)

    def _free(self, room: int, block: int) -> None:
        self.free[room].append(block)
        self.rooms |= 1 << room

    @property
    def blocks(self) -> int:
        return len(self.used)

    def place(self, size: int) -> int:
        need = -(-size // _SLOT)
        per = self.PER_BLOCK
        if need <= per:
            used, free = self.used, self.free
            while fits := self.rooms >> need:
                room = need + (fits & -fits).bit_length() - 1  # the least room that fits
                bucket = free[room]
                b = bucket.pop()
                if not bucket:
                    self.rooms &= ~(1 << room)
                taken = used[b]
                if per - taken != room:
                    continue  # stale: the block filled since
                used[b] = taken + need
                if room > need:  # (what _free does)
                    free[room - need].append(b)
                    self.rooms |= 1 << (room - need)
                return b * per + taken
        b = len(self.used)
        whole, last = divmod(need, per)
        self.used.extend([per] * whole)
        if last:
            self.used.append(last)
            self._free(per - last, len(self.used) - 1)
        return b * per


def _choose_epoch(nodes: list[Inode]) -> int:
    counted: Counter[int | None] = Counter(map(attrgetter("mtime_ns"), nodes))
    times = {t: c for t, c in counted.items() if t is not None and t >= 0}
    if not times:
        return 0
    best = max(times.values())
    return min(t for t, c in times.items() if c == best)


def write_metadata(fd: int, root: Inode, *, data_end: int,
                   read_tail: Callable[[Inode, int], bytes],
                   uuid: bytes) -> ImageLayout:
    """Write the shared xattr area, the metadata area, the block area and the
    superblock of the image open at ``fd``, whose data area ends at block
    ``data_end``.
    ``read_tail(node, n)`` returns the last ``n`` bytes of a regular file
    (those the writer kept out of the data area); a regular file's
    ``node.data`` is the block address of its whole blocks."""
    # -- order, link counts, parents ----------------------------------------
    # (an Inode hashes by identity: the dicts are keyed by the records themselves)
    rroot = _Rec(root)
    recs = [rroot]
    index: dict[Inode, _Rec] = {root: rroot}
    parents: dict[Inode, Inode] = {root: root}
    queue = [rroot]
    for drec in queue:  # grows as directories are met: breadth first
        d = drec.node
        assert d.children is not None
        subdirs = 0
        for child in d.children.values():
            rec = index.get(child)
            if child.kind == _DIR:
                if rec is None:
                    rec = _Rec(child)
                    index[child] = rec
                    recs.append(rec)
                    parents[child] = d
                    queue.append(rec)
                subdirs += 1
                continue
            if rec is None:
                rec = _Rec(child)
                index[child] = rec
                recs.append(rec)
            rec.nlink += 1
        drec.nlink = 2 + subdirs
    nodes = [r.node for r in recs]
    epoch = _choose_epoch(nodes)
    shared = _SharedXattrs(nodes)
    del nodes
    xattr_blkaddr = data_end if shared.blocks else 0
    meta_blkaddr = data_end + shared.blocks
    if shared.blocks:
        os.pwrite(fd, shared.area, xattr_blkaddr * BLK)

    # -- sizes, formats, nids; block addresses (those in the block area, which
    # starts after the metadata area, counted from its start until it is known)
    slots = _Slots()
    place, body = slots.place, shared.body
    nids: list[int] = []
    moved: list[_Rec] = []  # with a block address in the block area
    copies: list[_Rec] = []
    area = 0  # blocks of the block area so far
    for rec in recs:
        node = rec.node
        kind = node.kind
        if kind == _DIR:
            rec.dirblocks, size = _pack_dir(_dir_entries(node, parents[node]))
        elif kind in _REG_LNK:
            size = node.size
        else:
            size = 0  # devices, FIFOs: no data
        rec.size = size
        rec.tail = tail = size % BLK
        mtime = node.mtime_ns
        rec.extended = extended = (
            (mtime is not None and mtime != epoch) or node.uid > 0xFFFF or node.gid > 0xFFFF
            or rec.nlink > 0xFFFF or size >= 1 << 32)
        rec.xattr = xattr = body(node) if node.xattrs else b""
        head = (64 if extended else 32) + len(xattr)
        rec.inline = inline = tail > 0 and head + tail <= BLK and not node.tail_in_data
        rec.nid = nid = place(head + tail if inline else head)
        nids.append(nid)
        rec.fmt = _FORMATS[extended, inline]
        own_tail = tail and not inline  # a block of its own
        if kind == _REG:
            if own_tail and not node.tail_in_data:
                copies.append(rec)
                moved.append(rec)
                rec.blkaddr = area
                area += size // BLK + 1
            else:
                assert isinstance(node.data, int)
                rec.blkaddr = node.data
        elif kind in _DIR_LNK:
            blocks = size // BLK + (1 if own_tail else 0)
            if blocks:
                moved.append(rec)
                rec.blkaddr = area
                area += blocks
    if rroot.nid > 0xFFFF:  # pragma: no cover - the root is laid out first
        raise InvalidArgument("EROFS image: the root inode's nid does not fit 16 bits")
    meta_blocks = slots.blocks
    area_start = meta_blkaddr + meta_blocks
    for rec in moved:
        rec.blkaddr += area_start
    nextblk = area_start + area
    # every block address is below the larger of these
    if (data_end > 1 << 32 or nextblk > 1 << 32) and any(
            rec.blkaddr >= 1 << 32 for rec in recs):
        raise InvalidArgument("EROFS image: more than 2**32 blocks")

    # -- write ---------------------------------------------------------------
    meta_base = meta_blkaddr * BLK
    buf = bytearray()
    buf_at = meta_base
    esecs, ensec = divmod(epoch, 1_000_000_000)
    pack_extended, pack_compact = F.INODE_EXTENDED.pack, F.INODE_COMPACT.pack
    for i in sorted(range(len(recs)), key=nids.__getitem__):  # in nid order
        rec = recs[i]
        ino = i + 1
        nid = nids[i]
        node = rec.node
        gap = meta_base + nid * _SLOT - buf_at - len(buf)
        if gap:
            buf += bytes(gap)
        kind = node.kind
        i_u = node.rdev if kind in _DEVICES else rec.blkaddr
        xattr = rec.xattr
        icount = (len(xattr) - 12) // 4 + 1 if xattr else 0
        if rec.extended:
            mtime = node.mtime_ns
            secs, nsec = divmod(epoch if mtime is None else mtime, 1_000_000_000)
            buf += pack_extended(rec.fmt, icount, kind | node.mode, 0, rec.size, i_u, ino,
                                 node.uid, node.gid, secs & (2**64 - 1), nsec,
                                 rec.nlink, _ZERO16)
        else:
            buf += pack_compact(rec.fmt, icount, kind | node.mode, rec.nlink, rec.size, 0,
                                i_u, ino, node.uid, node.gid, 0)
        if xattr:
            buf += xattr
        if kind == _REG:
            if rec.inline:
                buf += read_tail(node, rec.tail)
        elif kind == _DIR:
            dblocks = _dir_blocks(rec, _dir_entries(node, parents[node]), index)
            if rec.inline:
                buf += dblocks.pop()
            if dblocks:
                os.pwrite(fd, b"".join(dblocks), rec.blkaddr * BLK)
        elif kind == _LNK:
            if rec.inline:
                buf += node.target
            else:
                os.pwrite(fd, node.target, rec.blkaddr * BLK)
        if len(buf) >= _FLUSH:
            os.pwrite(fd, buf, buf_at)
            buf_at += len(buf)
            buf = bytearray()
    if buf:
        os.pwrite(fd, buf, buf_at)
    for rec in copies:
        node = rec.node
        whole = rec.size // BLK
        assert isinstance(node.data, int)
        done = 0
        while done < whole * BLK:
            done += os.copy_file_range(fd, fd, whole * BLK - done,
                                       node.data * BLK + done, rec.blkaddr * BLK + done)
        os.pwrite(fd, read_tail(node, rec.tail), (rec.blkaddr + whole) * BLK)
    total_blocks = nextblk
    os.ftruncate(fd, total_blocks * BLK)
    sb = F.SUPER_BLOCK.pack(F.EROFS_SUPER_MAGIC_V1, 0, 0, F.EROFS_BLKSIZBITS, 0, rroot.nid,
                            len(recs), esecs, ensec, total_blocks, meta_blkaddr,
                            xattr_blkaddr, uuid, bytes(16), 0, 0, 0, 0, 0, 0, 0, 0, 0,
                            bytes(23))
    os.pwrite(fd, sb, F.EROFS_SUPER_OFFSET)
    return ImageLayout(len(recs), rroot.nid, total_blocks, epoch)


def _dir_blocks(rec: _Rec, ents: list[tuple[bytes, Inode]],
                index: dict[Inode, _Rec]) -> list[bytes]:
    """The directory's blocks (the last one not padded)."""
    out: list[bytes] = []
    k = 0
    last = len(rec.dirblocks) - 1
    pack, types = F.DIRENT.pack, F.EROFS_FT
    for b, count in enumerate(rec.dirblocks):
        chunk = ents[k:k + count]
        k += count
        heads = []
        nameoff = _DIRENT * count
        for name, child in chunk:
            heads.append(pack(index[child].nid, nameoff, types[child.kind], 0))
            nameoff += len(name)
        heads.extend([name for name, _ in chunk])
        block = b"".join(heads)
        if b != last:
            block += bytes(BLK - len(block))
        out.append(block)
    return out
