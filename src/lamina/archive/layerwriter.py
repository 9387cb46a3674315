"""Writing a layer from a sequence of changes.

A diff is computed first (:mod:`lamina.archive.changes` yields the changes
between two trees, or those an overlayfs upper directory stands for) and
written second, here: :func:`write_layer` turns each :class:`Member` and
:class:`Whiteout` into a PAX tar member, in the order given, through the
compressor, hashing the tar (the DiffID) and the compressed stream (the
blob digest) on the way. The writer decides nothing about what changed; the
walk decides nothing about tar.

Members have numeric owners and nanosecond mtimes, so equal changes give
byte-identical layers. A whiteout is an empty regular file with mode 0,
owner 0:0 and its parent directory's mtime. Sockets have no tar form and
are left out.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from lamina.archive.compression import Compression, Sink, compressor
from lamina.archive.tarwriter import TarWriter
from lamina.archive.whiteout import WHITEOUT_PREFIX
from lamina.errors import FailedPrecondition

__all__ = ["Change", "DiffResult", "Member", "Whiteout", "write_layer"]

_READ_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
               | getattr(os, "O_NOATIME", 0))


class Member(NamedTuple):
    """An entry as it is now: member ``path``, its lstat ``stat`` and ``xattrs``.

    ``at`` (directory descriptor, name) is where the writer reads a regular
    file's data and a symlink's target; it must stay valid until the next
    change is asked for (None will do for a directory). With ``link_to`` the
    member is a hard link to that earlier member."""

    path: str
    stat: os.stat_result
    at: tuple[int, str] | None
    xattrs: Mapping[str, bytes]
    link_to: str | None = None


class Whiteout(NamedTuple):
    """A whiteout member ``path`` (``.wh.<name>`` or the opaque marker) in a
    directory whose mtime is ``mtime_ns``."""

    path: str
    mtime_ns: int


Change = Member | Whiteout


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

    def whiteout(self, w: Whiteout) -> None:
        self.tar.add(w.path, "0", mode=0, uid=0, gid=0, mtime_ns=w.mtime_ns)

    def member(self, m: Member) -> None:
        if m.path.rpartition("/")[2].startswith(WHITEOUT_PREFIX):
            # in a layer the name says "delete": written, the file would turn into a
            # whiteout of its sibling (the OCI layer format cannot carry it)
            raise FailedPrecondition(
                f"layer: {m.path!r} cannot go into a layer: a name beginning "
                f"{WHITEOUT_PREFIX!r} means a whiteout there")
        st, at = m.stat, m.at
        mode = st.st_mode
        size = 0
        linkname = ""
        devmajor = devminor = 0
        if m.link_to is not None:
            typeflag, linkname = "1", m.link_to
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
        fd: int | None = None
        if size:
            assert at is not None
            # not blocking: what was listed as a file may be a FIFO by now
            fd = os.open(at[1], _READ_FLAGS, dir_fd=at[0])
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise FailedPrecondition(f"layer: {m.path!r} changed while the layer was "
                                         "being written (is a container running on it?)")
        try:
            self.tar.add(m.path, typeflag, mode=stat.S_IMODE(mode), uid=st.st_uid,
                         gid=st.st_gid, mtime_ns=st.st_mtime_ns, size=size, linkname=linkname,
                         devmajor=devmajor, devminor=devminor, xattrs=m.xattrs, data_fd=fd)
        finally:
            if fd is not None:
                os.close(fd)


def write_layer(
    changes: Iterable[Change], out: Sink, *, compression: str | Compression = "gzip",
) -> DiffResult:
    """Write ``changes`` as a tar layer to ``out``, compressed; returns its digests
    and sizes. Each change is written before the next is asked for."""
    layer = _Layer(out, compression)
    for change in changes:
        if isinstance(change, Whiteout):
            layer.whiteout(change)
        else:
            layer.member(change)
    return layer.finish()
