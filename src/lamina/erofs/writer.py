"""Write a layer as one EROFS image file, straight from its tar stream.

:func:`write_image` reads the layer (plain, gzip or zstd) with lamina's tar
reader, so every limit of :mod:`lamina.archive.limits` holds with the same
one-line InvalidArgument errors as :func:`lamina.archive.apply.apply_layer`,
and builds the tree that apply_layer would leave on an empty directory (see
:mod:`lamina.erofs.tree`). Nothing is ever extracted.

Streaming: a regular file's whole blocks go into the image as they are read
(blocks of zeros are left as holes of a sparse image file); its last partial
block is kept aside (in memory, up to 32 MiB of them, then in an unlinked
file), and comes back when the metadata is laid out, inline after its inode
where it fits (FLAT_INLINE). Memory follows the number of entries (a small
record each), never file sizes. The metadata is written after the data (:mod:`lamina.erofs.image`).

Failure model: the image is written to a temporary file in the destination's
directory, fsynced, and renamed into place (then the directory is fsynced);
any error removes the temporary file, so the destination never holds a half
image. A replaced or hidden regular file of the layer leaves its blocks unused
in the data area.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from lamina.archive import limits
from lamina.archive.compression import open_decompressed
from lamina.archive.tarstream import TarEntry, TarReader, show_name
from lamina.erofs import format as F
from lamina.erofs.digest import ImageHasher
from lamina.erofs.image import inline_room, write_metadata
from lamina.erofs.inode import Inode, RootMeta
from lamina.erofs.tree import LayerTree
from lamina.errors import Internal, InvalidArgument, LaminaError, while_doing
from lamina.fs.files import WRITEBACK_EVERY, atomic_file, start_writeback

__all__ = ["WrittenImage", "write_image"]

BLK = F.EROFS_BLKSIZ
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_TAILS_IN_MEMORY = 32 << 20


@dataclass(frozen=True)
class WrittenImage:
    """What :func:`write_image` produced: the layer's ``diff_id`` and
    uncompressed ``size`` (as apply_layer reports them), whether the layer
    listed its root, the number of ``inodes``, the image's size in bytes and
    its ``digest`` (the record :mod:`lamina.erofs.digest` defines)."""

    diff_id: str
    size: int
    root_listed: bool
    inodes: int
    image_size: int
    digest: str


def _is_zero(chunk: memoryview) -> bool:
    """Whether a chunk is all zeros (a hole in the image); the ends are looked
    at first, so data costs nothing and zeros one copy."""
    n = len(chunk)
    if not n or chunk[0] or chunk[n - 1]:
        return False
    return chunk.tobytes() == (_ZEROS if n == _CHUNK else bytes(n))


class _Tails:
    """The last partial blocks of regular files, kept aside until the metadata
    is laid out: in memory up to :data:`_TAILS_IN_MEMORY` bytes (a write and a
    read per file cost more than the copy), in an unlinked file in
    ``directory`` beyond."""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        self.size = 0

    def add(self, reader: TarReader) -> int:
        """Keep the rest of the member ``reader`` is in; where it went."""
        at = self.size
        if self._file is None:
            memory = self._memory
            memory += reader.read_data(BLK)  # a tail is shorter: all of it but at a chunk's end
            while reader.remaining:
                memory += reader.read_data(BLK)
            self.size = len(memory)
            if self.size > _TAILS_IN_MEMORY:
                self._file = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115
                self._file.write(memory)
                self._memory = bytearray()
            return at
        while reader.remaining:
            chunk = reader.read_data(BLK)
            self._file.write(chunk)
            self.size += len(chunk)
        return at

    def get(self, at: int, n: int) -> bytes:
        if self._file is None:
            return bytes(memoryview(self._memory)[at:at + n])  # one copy, not two
        self._file.flush()
        data = os.pread(self._file.fileno(), n, at)
        if len(data) != n:  # pragma: no cover - the file is ours
            raise Internal("EROFS image: spool file came back short")
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _Data:
    """The data area and the tails."""

    def __init__(self, fd: int, tails: _Tails) -> None:
        self.fd = fd
        self.tails = tails
        self.next_block = 1  # block 0 holds the superblock
        self.hasher = ImageHasher()  # the data area is hashed as it streams
        self.written_back = 0  # the data area's writeback is started up to here

    def stream(self, node: Inode, reader: TarReader) -> None:
        """Copy the member's data: whole blocks to the image, the tail aside
        (or, when it cannot fit inline, to the block after them)."""
        size = reader.remaining
        node.size = size
        tail = size % BLK
        # without xattrs the room is BLK - 64; xattrs only take from it
        if tail > BLK - 64 or (node.xattrs and tail > inline_room(node)):
            node.tail_in_data = True
            tail = 0
        if size == tail:  # most files: no whole block
            node.data = 0
            if tail:
                node.tail_at = self.tails.add(reader)
            return
        whole = size - tail
        node.data = self.next_block
        at = self.next_block * BLK
        left = whole
        fd = self.fd
        feed = self.hasher.feed
        while left:
            chunk = reader.read_data(min(_CHUNK, left))
            n = len(chunk)
            feed(at, chunk)
            if chunk[0] or chunk[n - 1] or not _is_zero(chunk):  # the ends first: no call
                view = chunk
                off = at
                while view:
                    written = os.pwrite(fd, view, off)
                    view = view[written:]
                    off += written
            at += n
            left -= n
        self.next_block += -(-whole // BLK)
        if at - self.written_back >= WRITEBACK_EVERY:  # the image's fsync waits for less
            start_writeback(fd, self.written_back, at - self.written_back)
            self.written_back = at
        if tail:
            node.tail_at = self.tails.add(reader)

    def tail(self, node: Inode, n: int) -> bytes:
        return self.tails.get(node.tail_at, n)


def _shown_root(node: Inode, epoch_ns: int) -> RootMeta:
    """The root's metadata as a mount shows it: a time the layer did not give
    is the image's epoch (the compact inodes' time)."""
    return RootMeta(mode=node.mode & 0o7777, uid=node.uid, gid=node.gid,
                    mtime_ns=epoch_ns if node.mtime_ns is None else node.mtime_ns,
                    xattrs=tuple(sorted(node.xattrs.items())))


def write_image(
    stream: IO[bytes],
    dest: str | os.PathLike[str],
    *,
    overlay: bool = True,
    expected_diff_id: str | None = None,
    progress: Callable[[int], None] | None = None,
    max_size: int | None = limits.DEFAULT_MAX_LAYER_SIZE,
    root: RootMeta | Callable[[], RootMeta | None] | None = None,
    drop_needless_whiteouts: bool = False,
    lower: str | os.PathLike[str] | Callable[[], str | None] | None = None,
    on_root: Callable[[RootMeta], None] | None = None,
) -> WrittenImage:
    """Write the layer read from ``stream`` as the EROFS image file ``dest``.

    ``overlay`` has apply_layer's meaning: True writes the layer the way an
    overlayfs lower directory says it (whiteout devices, opaque xattrs;
    :class:`~lamina.archive.apply.NeedsLowerLayers` where it cannot), False
    the layer applied on an empty directory. ``expected_diff_id``,
    ``progress`` and ``max_size`` are as for apply_layer; ``root`` is the
    root directory's metadata unless the layer lists its root (default: 0755,
    owned by 0:0, no xattrs). With ``drop_needless_whiteouts`` (overlay
    form), whiteouts that hide nothing in ``lower`` (the merged tree of the
    lower layers, e.g. a mounted view; None: no lowers) are left out, as
    staged extraction does; with ``lower`` given, a parent directory the
    layer does not list takes its metadata from there (else NeedsLowerLayers).
    In overlay form ``root`` and ``lower`` may be
    callables, called once the whole stream has been read (``root`` first,
    always; ``lower`` when whiteouts are dropped): a layer can be written while
    its parent is still being made, and settled against it at the end, as a
    staged upperdir is (the root's metadata is the parent's unless listed).
    ``on_root`` is told the root directory's metadata as a mount of the image
    will show it, as soon as the metadata is written (before the image is made
    durable): a layer written above this one in parallel can settle against it
    without waiting for this one's commit. On any error ``dest`` is left as it was.
    """
    if not overlay and (callable(root) or callable(lower)):
        raise ValueError("root and lower are callables only in overlay form")
    dest = os.fspath(dest)
    directory = os.path.dirname(dest) or "."
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(f"write EROFS image: directory {directory} does not exist") from None
    try:  # the guard checks the space through dir_fd while the layer is read
        space = limits.SpaceGuard(dir_fd, directory, action="write EROFS image")
        space.check()
    except BaseException:
        os.close(dir_fd)
        raise
    meter = limits.LayerMeter(space, progress)
    tree = LayerTree(overlay=overlay, root=None if callable(root) else root,
                     lower_dirs=overlay and lower is not None)
    current: TarEntry | None = None
    try:
        with atomic_file(dest, mode=0o644) as fd, \
                contextlib.closing(_Tails(directory)) as tails, \
                open_decompressed(stream, max_size=max_size) as plain:
            data = _Data(fd, tails)
            reader = TarReader(plain, meter)
            while (e := reader.next()) is not None:
                current = e
                node = tree.add(e)
                if node is not None:
                    data.stream(node, reader)
            current = None
            reader.drain()
            tree.finish()
            diff_id = meter.verified(expected_diff_id)
            if callable(root):
                # the data is on disk while the parent is being made: the final
                # fsync (after the parent's commit, in order) has only metadata left
                os.fdatasync(fd)
                tree.settle_root(root())
            if callable(lower):
                # asked for only where it decides something: a mount of the lowers
                # (and, for a streamed layer, the wait for its parent's commit)
                lower = lower() if (drop_needless_whiteouts and tree.whiteouts) \
                    or tree.implicit else None
            below = os.fspath(lower) if lower is not None else None
            tree.settle_implicit(below)
            if drop_needless_whiteouts:
                tree.drop_needless_whiteouts(below)
                tree.prune_implicit()
            layout = write_metadata(fd, tree.root, data_end=data.next_block,
                                    read_tail=data.tail, uuid=meter.digest.digest()[:16])
            if on_root is not None:
                on_root(_shown_root(tree.root, layout.epoch_ns))
            digest = data.hasher.finish(fd, layout.blocks * BLK)
    except LaminaError:
        raise
    except OSError as exc:
        name = show_name(current.name) if current else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise space.explain(exc, name or dest, False) from exc
        where = f" at {name}" if name else ""
        raise while_doing(f"write EROFS image{where}", exc) from exc
    finally:
        os.close(dir_fd)
    return WrittenImage(diff_id=diff_id, size=reader.total, root_listed=tree.root_listed,
                        inodes=layout.inodes, image_size=layout.blocks * BLK, digest=digest)
