"""The digest lamina records for an EROFS image: sha256 over the image's bytes
from byte 4096 to its end, then its first 4096 bytes (block 0).

Why that order: the writer lays the data area out first, from block 1 on, and
writes block 0 (the superblock) last. In this order the image can be hashed
while it is written: the data area as it streams (where the layer's files are
written in parallel, before each waits for its parent's commit), then the
metadata (a small part, read back once laid out), then block 0. A plain
sha256 of the file would have to read the whole image again once it is done.

A record reads ``sha256:<hex> block0-last``; a record without the second
word (``sha256:<hex>``, as lamina wrote before) is the sha256 of the file's
bytes in order. :func:`file_digest` computes either from a file, so a
verifier checks each record by the definition it names. Every byte of the
image is in both, so a changed byte anywhere changes the digest.
"""

from __future__ import annotations

import hashlib
import os

from lamina.errors import InvalidArgument

__all__ = ["BLOCK0_LAST", "ImageHasher", "file_digest", "parse_record"]

#: the word after the digest in a record of this module's definition
BLOCK0_LAST = "block0-last"
_HEAD = 4096  # block 0: the image's block size is 4 KiB (lamina.erofs.format)
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


class ImageHasher:
    """The digest of an image being written: :meth:`feed` its data area in order
    (gaps between what is fed are zeros, as holes of the sparse image are),
    then :meth:`finish` once the image is complete."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.at = _HEAD  # the bytes before this offset are hashed

    def feed(self, at: int, data: bytes | memoryview) -> None:
        """Hash ``data``, the image's bytes from offset ``at`` (never before :attr:`at`)."""
        if at != self.at:  # a hole before it (most data follows what came before)
            if at < self.at:
                raise ValueError(f"image digest: offset {at} was hashed already")
            self._zeros(at - self.at)
        self._h.update(data)
        self.at = at + len(data)

    def _zeros(self, n: int) -> None:
        while n > 0:
            step = min(n, _CHUNK)
            self._h.update(_ZEROS[:step] if step < _CHUNK else _ZEROS)
            n -= step

    def finish(self, fd: int, size: int) -> str:
        """The record of the image open at ``fd``, ``size`` bytes long: the bytes
        not fed yet are read back from the file, block 0 last."""
        _hash_range(self._h, fd, self.at, size)
        _hash_range(self._h, fd, 0, _HEAD)
        self.at = size
        return f"sha256:{self._h.hexdigest()} {BLOCK0_LAST}"


def _hash_range(h: hashlib._Hash, fd: int, start: int, end: int) -> None:
    buf = bytearray(min(_CHUNK, max(end - start, 0)))
    view = memoryview(buf)
    at = start
    while at < end:
        n = os.preadv(fd, [view[:min(len(buf), end - at)]], at)
        if n <= 0:
            raise InvalidArgument(f"image digest: the file ends at byte {at}, before {end}")
        h.update(view[:n])
        at += n


def parse_record(record: str) -> tuple[str, bool]:
    """``(digest, block0_last)`` of a recorded line; InvalidArgument if it is neither form."""
    words = record.split()
    if words[1:] in ([], [BLOCK0_LAST]) and words and words[0].startswith("sha256:"):
        return words[0], len(words) == 2
    raise InvalidArgument(f"unknown image digest record {record.strip()!r}")


def file_digest(path: str | os.PathLike[str], *, block0_last: bool) -> str:
    """The sha256 (``sha256:<hex>``) of the image file ``path``: of its bytes in
    order, or, with ``block0_last``, as this module defines it."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if block0_last:
            _hash_range(h, fd, min(_HEAD, size), size)
            _hash_range(h, fd, 0, min(_HEAD, size))
        else:
            _hash_range(h, fd, 0, size)
    finally:
        os.close(fd)
    return "sha256:" + h.hexdigest()
