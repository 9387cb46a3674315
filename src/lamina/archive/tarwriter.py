"""A small deterministic PAX tar writer.

:class:`TarWriter` writes ustar headers, preceded by a PAX extended header
(``x``) whenever a value does not fit ustar exactly: long or non-ASCII
names, big sizes or owners, sub-second or negative mtimes, xattrs
(``SCHILY.xattr.<name>``). Owners are numeric only (no user or group
names), so output depends on nothing but the entries given. Output is
buffered and handed to ``write`` in chunks of about 1 MiB.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from lamina.errors import FailedPrecondition, Internal

__all__ = ["TarWriter"]

_BLOCK = 512
_FLUSH_AT = 1 << 20
_READ = 1 << 20


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _fmt_time(ns: int) -> bytes:
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), 1_000_000_000)
    if frac:
        return f"{sign}{sec}.{frac:09d}".rstrip("0").encode()
    return f"{sign}{sec}".encode()


def _octal(value: int, width: int) -> bytes:
    """``width``-byte NUL-terminated octal field (caller made sure it fits)."""
    return b"%0*o\0" % (width - 1, value)


def _fits(value: int, width: int) -> bool:
    return 0 <= value < 1 << (3 * (width - 1))


class TarWriter:
    """Write tar members to ``write`` (called with bytes); :meth:`close` ends the archive."""

    def __init__(self, write: Callable[[bytes], Any]) -> None:
        self._write = write
        self._buf = bytearray()

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Hand buffered bytes to ``write``."""
        if self._buf:
            self._write(bytes(self._buf))
            self._buf.clear()

    def add(
        self,
        name: str,
        typeflag: str,
        *,
        mode: int,
        uid: int,
        gid: int,
        mtime_ns: int,
        size: int = 0,
        linkname: str = "",
        devmajor: int = 0,
        devminor: int = 0,
        xattrs: Mapping[str, bytes] | None = None,
        data_fd: int | None = None,
    ) -> None:
        """Write one member; regular-file data (``size`` bytes) is read from ``data_fd``.

        Directory names get a trailing ``/``. Raises FailedPrecondition if
        ``data_fd`` yields fewer than ``size`` bytes (the file shrank while being
        read).
        """
        if typeflag == "5" and not name.endswith("/"):
            name += "/"
        name_b = os.fsencode(name)
        link_b = os.fsencode(linkname)
        pax: list[bytes] = []
        if len(name_b) > 100 or not name_b.isascii():
            pax.append(_pax_record("path", name_b))
        if len(link_b) > 100 or not link_b.isascii():
            pax.append(_pax_record("linkpath", link_b))
        if not _fits(size, 12):
            pax.append(_pax_record("size", str(size).encode()))
        if not _fits(uid, 8):
            pax.append(_pax_record("uid", str(uid).encode()))
        if not _fits(gid, 8):
            pax.append(_pax_record("gid", str(gid).encode()))
        mtime_s = mtime_ns // 1_000_000_000
        if mtime_ns % 1_000_000_000 or not _fits(mtime_s, 12):
            pax.append(_pax_record("mtime", _fmt_time(mtime_ns)))
        if xattrs:
            for key in sorted(xattrs):
                pax.append(_pax_record("SCHILY.xattr." + key, xattrs[key]))
        if pax:
            data = b"".join(pax)
            self._emit(self._header(b"PaxHeader/" + name_b[-80:], "x", 0o644, 0, 0, 0, len(data)))
            self._emit(data)
            self._emit(bytes(-len(data) % _BLOCK))
        self._emit(
            self._header(
                name_b[:100],
                typeflag,
                mode & 0o7777,
                uid if _fits(uid, 8) else 0,
                gid if _fits(gid, 8) else 0,
                mtime_s if _fits(mtime_s, 12) else 0,
                size if _fits(size, 12) else 0,
                link_b[:100],
                devmajor,
                devminor,
            )
        )
        if typeflag in ("0", "7") and size:
            if data_fd is None:
                raise Internal(f"tar writer: no data for {name!r}")
            self._copy(data_fd, size, name)

    def _copy(self, fd: int, size: int, name: str) -> None:
        left = size
        while left:
            chunk = os.read(fd, min(left, _READ))
            if not chunk:
                raise FailedPrecondition(f"layer: {name!r} shrank while the layer was being "
                                         "written (is a container running on it?)")
            left -= len(chunk)
            if len(chunk) >= _FLUSH_AT:
                self.flush()
                self._write(chunk)
            else:
                self._emit(chunk)
        self._emit(bytes(-size % _BLOCK))

    @staticmethod
    def _header(
        name: bytes,
        typeflag: str,
        mode: int,
        uid: int,
        gid: int,
        mtime: int,
        size: int,
        linkname: bytes = b"",
        devmajor: int = 0,
        devminor: int = 0,
    ) -> bytes:
        block = bytearray(_BLOCK)
        block[0 : len(name)] = name
        block[100:108] = _octal(mode, 8)
        block[108:116] = _octal(uid, 8)
        block[116:124] = _octal(gid, 8)
        block[124:136] = _octal(size, 12)
        block[136:148] = _octal(mtime, 12)
        block[148:156] = b" " * 8
        block[156:157] = typeflag.encode("latin-1")
        block[157 : 157 + len(linkname)] = linkname
        block[257:265] = b"ustar\x0000"
        if typeflag in ("3", "4"):
            block[329:337] = _octal(devmajor, 8)
            block[337:345] = _octal(devminor, 8)
        block[148:156] = b"%06o\0 " % sum(block)
        return bytes(block)

    def close(self) -> None:
        """Write the two zero end-of-archive blocks and flush."""
        self._emit(bytes(2 * _BLOCK))
        self.flush()
