"""Layer compression: detection, streaming decompression, compressors, media types.

Layers arrive gzip- or zstd-compressed or as plain tar. :func:`open_decompressed`
sniffs the first bytes and returns a readable stream of the uncompressed tar.
Every compressed stream is validated to its very end: a gzip member's CRC and
length trailer are checked, a zstd stream must end on a frame boundary (and its
content checksum, when present, is verified by libzstd). A stream that is cut
short raises :class:`~lamina.errors.InvalidArgument`; it is never accepted as a
shorter layer. With ``max_size``, the stream stops with
:class:`~lamina.errors.ResourceExhausted` (:func:`too_large`) as soon as it has produced more
uncompressed bytes than that: a decompression bomb costs at most one chunk
beyond the cap.

:func:`compressor` wraps an output stream in a writer for ``'gzip'``,
``'zstd'`` or ``'none'``; closing the writer finishes the compressed stream but
leaves the output open.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable
from typing import IO, Any, Protocol, cast

from isal import igzip as _igzip
from isal.isal_zlib import IsalError as _IsalError

from lamina.errors import InvalidArgument, ResourceExhausted
from lamina.util.rawio import RawReader
from lamina.util.readahead import ReadAhead

# isal types IsalError as an instance; it is the exception class
_ISAL_ERROR = cast("type[BaseException]", _IsalError)
# what a decompressor raises on a corrupt stream (zstd adds its own: ZstdError)
_STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, _ISAL_ERROR)

# zstandard is imported where a zstd stream is read or written: most layers are
# gzip, and its import (with the platform module it loads) is ~2.5 ms of every
# command that may read a layer (startup).

__all__ = [
    "MEDIA_TYPE_DOCKER_LAYER_GZIP",
    "MEDIA_TYPE_DOCKER_LAYER_TAR",
    "MEDIA_TYPE_DOCKER_LAYER_ZSTD",
    "MEDIA_TYPE_OCI_LAYER",
    "MEDIA_TYPE_OCI_LAYER_GZIP",
    "MEDIA_TYPE_OCI_LAYER_ZSTD",
    "Compression",
    "Decompressed",
    "Sink",
    "Writer",
    "compression_from_media_type",
    "compressor",
    "detect",
    "media_type",
    "open_decompressed",
    "size_hint",
    "too_large",
]

MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20
# isal ships partial annotations; use it untyped
igzip: Any = _igzip


def too_large(limit: int, what: str = "layer") -> ResourceExhausted:
    """The error for a layer that expands beyond ``limit`` uncompressed bytes."""
    return ResourceExhausted(f"{what} expands beyond {limit} bytes (--max-layer-size)")


class Compression(enum.Enum):
    """How a layer stream is compressed."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"

    @classmethod
    def parse(cls, value: str | Compression) -> Compression:
        """``'gzip'``/``'zstd'``/``'none'`` (or a member) to a member."""
        if isinstance(value, Compression):
            return value
        try:
            return cls(value.lower())
        except ValueError:
            raise InvalidArgument(f"unknown compression {value!r}") from None


_MEDIA_TYPES: dict[str, Compression] = {
    MEDIA_TYPE_OCI_LAYER: Compression.NONE,
    MEDIA_TYPE_OCI_LAYER_GZIP: Compression.GZIP,
    MEDIA_TYPE_OCI_LAYER_ZSTD: Compression.ZSTD,
    MEDIA_TYPE_DOCKER_LAYER_TAR: Compression.NONE,
    MEDIA_TYPE_DOCKER_LAYER_GZIP: Compression.GZIP,
    MEDIA_TYPE_DOCKER_LAYER_ZSTD: Compression.ZSTD,
    # non-distributable layers: same payloads
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}


def compression_from_media_type(media_type: str) -> Compression:
    """The compression a layer media type announces; InvalidArgument if not a layer type."""
    base = media_type.split(";", 1)[0].strip()
    try:
        return _MEDIA_TYPES[base]
    except KeyError:
        raise InvalidArgument(f"not a layer media type: {media_type!r}") from None


def media_type(compression: str | Compression, *, docker: bool = False) -> str:
    """The OCI (or Docker schema 2) layer media type for ``compression``."""
    kind = Compression.parse(compression)
    if docker:
        return {
            Compression.NONE: MEDIA_TYPE_DOCKER_LAYER_TAR,
            Compression.GZIP: MEDIA_TYPE_DOCKER_LAYER_GZIP,
            Compression.ZSTD: MEDIA_TYPE_DOCKER_LAYER_ZSTD,
        }[kind]
    return {
        Compression.NONE: MEDIA_TYPE_OCI_LAYER,
        Compression.GZIP: MEDIA_TYPE_OCI_LAYER_GZIP,
        Compression.ZSTD: MEDIA_TYPE_OCI_LAYER_ZSTD,
    }[kind]


def detect(prefix: bytes) -> Compression:
    """Guess the compression from a stream's first bytes (4 are enough)."""
    if prefix.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if prefix.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    return Compression.NONE


def size_hint(head: bytes, tail: bytes, size: int) -> int:
    """How many uncompressed bytes a layer of ``size`` bytes announces.

    ``head`` is its first 18 bytes, ``tail`` its last 4. A plain tar is its
    size; gzip announces its length modulo 2**32 in its trailer, zstd in its
    first frame's header (when the writer recorded it); an honest stream
    expands to at least that, and to about its compressed size at the least.
    Only for an early "this cannot fit" check: a stream may lie, and is
    bounded while it is read.
    """
    kind = detect(head)
    if kind is Compression.GZIP and len(tail) >= 4:
        return max(size, int.from_bytes(tail[-4:], "little"))
    if kind is Compression.ZSTD:
        import zstandard  # see the imports (startup)

        try:
            announced = zstandard.frame_content_size(head)
        except zstandard.ZstdError:
            announced = -1
        return max(size, announced)
    return size


class _Prefixed(RawReader):
    """A raw stream that replays ``prefix`` and then reads ``inner``; never closes it."""

    def __init__(self, prefix: bytes, inner: IO[bytes], on_read: Callable[[bytes], None] | None):
        super().__init__()
        self._prefix = prefix
        self._inner = inner
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            if size < 0 or size >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:size], self._prefix[size:]
        else:
            data = self._inner.read(_CHUNK if size < 0 else size) or b""
        if self._on_read is not None:
            self._on_read(data)
        return data


class _ZstdFrameChecker:
    """Follows the frame structure of a zstd stream to tell where it may end.

    libzstd's streaming reader reports a stream cut short as a plain end of
    data. This checker walks the frame headers, block headers and checksums of
    the compressed bytes as they pass by (without decompressing) so that an
    end of input in the middle of a frame can be reported as an error.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._need = 4  # bytes the current field needs
        self._state = "magic"
        self._skip = 0  # payload bytes to pass over
        self._checksum = False
        self.frames = 0

    @property
    def at_boundary(self) -> bool:
        return self._state == "magic" and not self._pending and self._skip == 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        n = len(view)
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                if self._skip == 0 and self._state == "skipdata":
                    self._state, self._need = "magic", 4
                continue
            take = min(self._need - len(self._pending), n - pos)
            self._pending += bytes(view[pos : pos + take])
            pos += take
            if len(self._pending) == self._need:
                field, self._pending = self._pending, b""
                self._advance(field)

    def _advance(self, field: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(field, "little")
            if field == _ZSTD_MAGIC:
                self._state, self._need = "fhd", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skipsize", 4
            else:
                raise InvalidArgument("zstd stream: bad frame magic (corrupt or trailing data)")
        elif state == "skipsize":
            self._skip = int.from_bytes(field, "little")
            self._state = "skipdata"
            if self._skip == 0:
                self._state, self._need = "magic", 4
        elif state == "fhd":
            fhd = field[0]
            if fhd & 0x08:
                raise InvalidArgument("zstd stream: reserved frame header bit set")
            fcs_flag = fhd >> 6
            single = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            dict_len = (0, 1, 2, 4)[fhd & 0x03]
            fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
            rest = (0 if single else 1) + dict_len + fcs_len
            self.frames += 1
            if rest:
                self._state, self._need = "fhrest", rest
            else:
                self._state, self._need = "block", 3
        elif state == "fhrest":
            self._state, self._need = "block", 3
        elif state == "block":
            header = int.from_bytes(field, "little")
            last = header & 1
            btype = (header >> 1) & 3
            bsize = header >> 3
            if btype == 3:
                raise InvalidArgument("zstd stream: reserved block type")
            payload = 1 if btype == 1 else bsize
            if last:
                if self._checksum:
                    nxt, nneed = "checksum", 4
                else:
                    nxt, nneed = "magic", 4
            else:
                nxt, nneed = "block", 3
            self._state, self._need = nxt, nneed
            self._skip = payload
        elif state == "checksum":
            self._state, self._need = "magic", 4


class Decompressed(RawReader):
    """The uncompressed view of a layer stream (see :func:`open_decompressed`).

    ``compression`` tells what was detected; ``total`` counts the bytes
    produced so far; ``errors`` are what ``reader`` raises on a corrupt stream
    besides the gzip and I/O ones. Reading past the end raises InvalidArgument if the
    compressed stream was truncated or corrupt, reading past ``max_size``
    bytes raises ResourceExhausted (:func:`too_large`). Closing releases decompressor resources but
    never closes the source.
    """

    def __init__(self, reader: IO[bytes], compression: Compression, finish: Callable[[], None],
                 max_size: int | None = None, *,
                 errors: tuple[type[BaseException], ...] = ()):
        super().__init__()
        self._reader = reader
        self._errors = _STREAM_ERRORS + errors
        self.compression = compression
        self._finish = finish
        self._done = False
        self.total = 0
        self._max = max_size

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._reader.read(size if size >= 0 else _CHUNK)
        except InvalidArgument:
            raise
        except self._errors as exc:
            raise InvalidArgument(
                f"corrupt or truncated {self.compression.value} layer stream: {exc}"
            ) from exc
        if not data:
            if size != 0 and not self._done:
                self._done = True
                self._finish()
            return b""
        self.total += len(data)
        if self._max is not None and self.total > self._max:
            raise too_large(self._max)
        return data

    def close(self) -> None:
        if not self.closed:
            try:
                self._reader.close()
            finally:
                super().close()


def open_decompressed(stream: IO[bytes], *, threads: int = 1,
                      max_size: int | None = None) -> Decompressed:
    """Return a readable stream of ``stream``'s uncompressed bytes (at most ``max_size``).

    The compression is detected from the magic bytes. gzip is decompressed by
    ISA-L (in a helper thread when ``threads`` > 0, so decompression overlaps
    with whatever the caller does with the data); zstd by libzstd. The source
    is read in chunks; nothing is held whole in memory.
    """
    head = b""
    while len(head) < 4:
        more = stream.read(4 - len(head))
        if not more:
            break
        head += more
    kind = detect(head)
    if kind is Compression.NONE:
        raw = _Prefixed(head, stream, None)
        return Decompressed(cast(IO[bytes], raw), kind, lambda: None, max_size)
    if kind is Compression.GZIP:
        raw = _Prefixed(head, stream, None)
        reader: IO[bytes]
        gz = igzip.GzipFile(fileobj=raw, mode="rb")
        if threads > 0:
            reader = cast(IO[bytes], ReadAhead(gz.read, block=_CHUNK, name="gunzip",
                                               on_close=gz.close))
        else:
            reader = cast(IO[bytes], gz)
        # ISA-L raises OverflowError for a header (name, comment) past its buffer
        return Decompressed(reader, kind, lambda: None, max_size, errors=(OverflowError,))
    import zstandard  # see the imports (startup)

    checker = _ZstdFrameChecker()

    def check_eof(data: bytes) -> None:
        if data:
            checker.feed(data)
        elif not checker.at_boundary or checker.frames == 0:
            raise InvalidArgument("corrupt or truncated zstd layer stream: ends inside a frame")

    raw = _Prefixed(head, stream, check_eof)
    zreader = zstandard.ZstdDecompressor().stream_reader(
        cast(IO[bytes], raw), read_size=_CHUNK, read_across_frames=True, closefd=False
    )

    def finish() -> None:
        # the decompressor has seen the source's end: make sure the checker has too
        while raw.read(_CHUNK):
            pass

    return Decompressed(cast(IO[bytes], zreader), kind, finish, max_size,
                        errors=(zstandard.ZstdError,))


class Sink(Protocol):
    """Where compressed output goes: anything with ``write(bytes)`` and ``flush()``."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


class Writer(Protocol):
    """What :func:`compressor` returns: write bytes, close to finish the stream."""

    def write(self, data: bytes | memoryview, /) -> int: ...

    def close(self) -> None: ...


class _Plain:
    def __init__(self, out: Sink) -> None:
        self._out = out

    def write(self, data: bytes | memoryview, /) -> int:
        self._out.write(bytes(data) if isinstance(data, memoryview) else data)
        return len(data)

    def close(self) -> None:
        self._out.flush()


class _Zstd:
    def __init__(self, out: Sink, level: int) -> None:
        import zstandard  # see the imports (startup)

        self._out = out
        self._w: Any = zstandard.ZstdCompressor(level=level).stream_writer(
            cast(IO[bytes], out), closefd=False, write_return_read=True
        )

    def write(self, data: bytes | memoryview, /) -> int:
        return int(self._w.write(data))

    def close(self) -> None:
        self._w.close()
        self._out.flush()


class _Gzip:
    def __init__(self, out: Sink, level: int) -> None:
        self._out = out
        self._w: Any = igzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0)

    def write(self, data: bytes | memoryview, /) -> int:
        return int(self._w.write(data))

    def close(self) -> None:
        self._w.close()
        self._out.flush()


def compressor(kind: str | Compression, out: Sink, *, level: int | None = None) -> Writer:
    """A writer that compresses into ``out`` with ``kind`` (``gzip``/``zstd``/``none``).

    gzip output is deterministic (mtime 0, no file name); ``level`` defaults to
    ISA-L's 2 for gzip and 3 for zstd. ``close()`` finishes the stream and
    flushes ``out`` but does not close it.
    """
    k = Compression.parse(kind)
    if k is Compression.GZIP:
        return _Gzip(out, 2 if level is None else level)
    if k is Compression.ZSTD:
        return _Zstd(out, 3 if level is None else level)
    return _Plain(out)
