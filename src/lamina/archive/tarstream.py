"""A streaming tar reader built for OCI layers.

:class:`TarReader` pulls 512-byte headers from an uncompressed tar stream and
yields one :class:`TarEntry` per real member, with the metadata members folded
in: GNU long names and link names (``L``/``K``), PAX extended headers (``x``)
and PAX global headers (``g``). Entry data is then read in chunks with
:meth:`TarReader.read_data`; whatever the caller leaves unread is skipped.

Every byte taken from the source goes through one place, so the reader can
hash the whole uncompressed stream (the layer's DiffID) including whatever
follows the end-of-archive marker (:meth:`TarReader.drain`).

What is rejected with :class:`~lamina.errors.InvalidArgument`: a header whose
checksum does not match, numeric fields that are not numbers, sizes above
:data:`MAX_MEMBER_SIZE`, metadata members (PAX, long names) above
:data:`MAX_META_SIZE` (each, and together in front of one member), malformed
PAX records, NUL bytes in names, GNU sparse files and unknown member types,
and a stream that ends inside a header or inside a member's data. A stream
that simply ends after a complete member, without the two zero
end-of-archive blocks, is accepted.

Values no Linux filesystem could hold are rejected too, in every encoding
(octal, GNU base-256, PAX records), before the member is handed out: names
and link targets of PATH_MAX or more, name components above NAME_MAX, device
numbers beyond dev_t, owners of 2**32-1 or more, modes beyond 0o177777, times
whose seconds do not fit 64 bits, xattrs beyond the caps. The caps and their
reasons are listed in :mod:`lamina.archive.limits`. Error messages name the
member (shortened when it is long).

PAX global headers apply to all following members; their ``path``,
``linkpath`` and ``size`` records are ignored (they cannot sensibly apply to
every member), the other records (owners, times, xattrs) are honoured.
"""

from __future__ import annotations

import base64
import binascii
import os
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from zlib import adler32

from lamina.archive import limits
from lamina.errors import InvalidArgument, ResourceExhausted

__all__ = [
    "BLOCK",
    "MAX_MEMBER_SIZE",
    "MAX_META_SIZE",
    "TYPE_BLOCK",
    "TYPE_CHAR",
    "TYPE_DIR",
    "TYPE_FIFO",
    "TYPE_HARDLINK",
    "TYPE_REGULAR",
    "TYPE_SYMLINK",
    "Readable",
    "TarEntry",
    "TarReader",
    "parse_pax",
]

BLOCK = 512
#: Largest member data accepted (1 TiB); a header claiming more is treated as hostile.
MAX_MEMBER_SIZE = 1 << 40
#: Largest metadata member (PAX header, GNU long name) accepted.
MAX_META_SIZE = 1 << 20
#: Most metadata members allowed in front of one real member, and in total for globals.
_MAX_META_CHAIN = 64
_MAX_GLOBAL_BYTES = 4 << 20
_READ_CHUNK = 1 << 20

TYPE_REGULAR = "0"
TYPE_HARDLINK = "1"
TYPE_SYMLINK = "2"
TYPE_CHAR = "3"
TYPE_BLOCK = "4"
TYPE_DIR = "5"
TYPE_FIFO = "6"

_ZERO_BLOCK = bytes(BLOCK)
_DIGITS = b"0123456789"
_OCTAL_DIGITS = b"01234567"
#: numeric header fields already parsed (bytes -> value), bounded
_SEEN: dict[bytes, int] = {}
_SEEN_MAX = 4096
#: the mode, uid and gid fields together (bytes 100..124) -> their values, bounded
_OWNERS: dict[bytes, tuple[int, int, int]] = {}
#: a name this short has no component above NAME_MAX, and is below PATH_MAX
_SHORT_NAME = min(limits.MAX_NAME_COMPONENT, limits.MAX_PATH - 1)
_MAX_ID, _MAX_MODE, _MAX_TIME_S = limits.MAX_ID, limits.MAX_MODE, limits.MAX_TIME_S
#: the type flag byte as the one-character string it is compared with
_TYPE_FLAGS = tuple(map(chr, range(256)))
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
# member types whose size field never announces data
_HEADER_ONLY = frozenset("123456")
_S_IFMT = 0o170000
_S_IFSOCK = 0o140000


@dataclass(slots=True)
class TarEntry:
    """One tar member, with PAX/GNU metadata already applied.

    ``type`` is one of the ``TYPE_*`` constants (contiguous files and v7
    regular files are reported as :data:`TYPE_REGULAR`, GNU dumpdirs as
    :data:`TYPE_DIR`). ``mode`` holds only permission and setuid/setgid/sticky
    bits; ``is_socket`` is set when the mode's file-type bits say socket.
    ``atime_ns`` is None unless a PAX ``atime`` record was present.
    """

    name: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    atime_ns: int | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    is_socket: bool = False


def _bad(msg: str) -> InvalidArgument:
    return InvalidArgument(f"invalid tar layer: {msg}")


def show_name(name: str | bytes, keep: int = 80, *, size: bool = True) -> str:
    """A member name for an error message: quoted, and shortened when long."""
    text = os.fsdecode(name) if isinstance(name, bytes) else name
    if len(text) <= keep:
        return repr(text)
    more = f" ({len(os.fsencode(text))} bytes)" if size else ""
    return f"{text[:keep]!r}...{more}"


def _check_path(raw: bytes, what: str, components: bool) -> None:
    if len(raw) >= limits.MAX_PATH:
        raise _bad(f"{what} {show_name(raw, size=False)} is {len(raw)} bytes long "
                   f"(limit {limits.MAX_PATH - 1}, PATH_MAX)")
    if components and len(raw) > limits.MAX_NAME_COMPONENT:
        longest = max(raw.split(b"/"), key=len)
        if len(longest) > limits.MAX_NAME_COMPONENT:
            raise _bad(f"{what} {show_name(raw)} has a component of {len(longest)} bytes "
                       f"(limit {limits.MAX_NAME_COMPONENT}, NAME_MAX)")


def _octal(fieldb: bytes, what: str) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256."""
    if fieldb and fieldb[0] & 0x80:
        if fieldb[0] == 0xFF:
            value = int.from_bytes(fieldb, "big", signed=True)
        else:
            value = int.from_bytes(bytes([fieldb[0] & 0x7F]) + fieldb[1:], "big")
        return value
    s = fieldb.split(b"\0", 1)[0].strip(b" ")
    if not s:
        return 0
    if s.translate(None, _OCTAL_DIGITS):
        raise _bad(f"{what} field {fieldb!r} is not an octal number")
    return int(s, 8)


def _octal_seen(fieldb: bytes, what: str) -> int:
    """:func:`_octal` of a field whose values repeat member after member (modes,
    owners, times): each distinct field is parsed once per process."""
    value = _SEEN.get(fieldb)
    if value is None:
        value = _octal(fieldb, what)
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        _SEEN[fieldb] = value
    return value


def _owner_mtime(block: bytes) -> tuple[tuple[int, int, int], int]:
    """The (mode, uid, gid) and mtime fields of a header whose owner fields
    were not met yet, parsed in the order their errors are reported."""
    raw_mode = _octal_seen(block[100:108], "mode")
    mtime_s = _octal_seen(block[136:148], "mtime")
    owner = (raw_mode, _octal_seen(block[108:116], "uid"), _octal_seen(block[116:124], "gid"))
    if len(_OWNERS) >= _SEEN_MAX:
        _OWNERS.clear()
    _OWNERS[block[100:124]] = owner
    return owner, mtime_s


def _who(e: TarEntry) -> str:
    return show_name(e.name)


def _decimal(value: bytes, what: str) -> int:
    if not value or value.strip(_DIGITS) or len(value) > 20:
        raise _bad(f"PAX {what} record {value[:40]!r} is not a decimal number")
    return int(value)


def _pax_time_ns(value: bytes, what: str) -> int:
    """A PAX time ("-12.345") as integer nanoseconds, exactly."""
    neg = value.startswith(b"-")
    body = value[1:] if neg else value
    whole, dot, frac = body.partition(b".")
    if not whole or whole.strip(_DIGITS) or len(whole) > 19 or (dot and frac.strip(_DIGITS)):
        raise _bad(f"PAX {what} record {value[:40]!r} is not a time")
    seconds = int(whole)
    if seconds > limits.MAX_TIME_S:
        raise _bad(f"PAX {what} record {value[:40]!r} is out of range (64-bit seconds)")
    ns = seconds * 1_000_000_000 + int((frac[:9] or b"0").ljust(9, b"0"))
    return -ns if neg else ns


def _name(raw: bytes, what: str) -> str:
    if b"\0" in raw:
        raise _bad(f"{what} contains a NUL byte")
    return raw.decode(_FS_ENCODING, _FS_ERRORS)  # os.fsdecode, without its type checks


def parse_pax(data: bytes) -> dict[str, bytes]:
    """Parse PAX extended-header records (``"%d %s=%s\\n"``) into a dict.

    Keys are decoded as UTF-8; values stay bytes. Malformed records raise
    InvalidArgument.
    """
    records: dict[str, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0:
            # some writers pad the extended header with NULs
            if data[pos:].strip(b"\0"):
                raise _bad("PAX header has data after NUL padding")
            break
        sp = data.find(b" ", pos, min(end, pos + 21))
        if sp <= pos:
            raise _bad("PAX record without a length")
        length_s = data[pos:sp]
        if length_s.strip(_DIGITS):
            raise _bad(f"PAX record length {length_s[:20]!r} is not a number")
        length = int(length_s)
        rec_end = pos + length
        if length <= sp - pos + 1 or rec_end > end or data[rec_end - 1] != 0x0A:
            raise _bad("PAX record length does not match the record")
        key, eq, value = data[sp + 1 : rec_end - 1].partition(b"=")
        if not eq or not key:
            raise _bad("PAX record without key=value")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = rec_end
    return records


class Readable(Protocol):
    """Anything with ``read(n) -> bytes``."""

    def read(self, size: int = -1, /) -> bytes: ...


class TarReader:
    """Iterate over an uncompressed tar stream, one member at a time.

    ``on_bytes`` is called with every chunk taken from ``source`` (for hashing
    and progress). Use :meth:`next` to get the next member (None at the end),
    :meth:`read_data` to stream its data, and :meth:`drain` after the last
    member to consume (and so hash) the rest of the stream.
    """

    def __init__(self, source: Readable, on_bytes: Callable[[bytes], None] | None = None):
        self._src = source
        self._on_bytes = on_bytes
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._remaining = 0  # unread data bytes of the current member
        self._padding = 0  # padding after the current member's data
        self._ended = False
        self._global: dict[str, bytes] = {}
        self._global_bytes = 0
        self.offset = 0  # stream offset of the next unread byte
        self.total = 0  # bytes taken from the source so far
        self.members = 0  # members returned so far (at most limits.MAX_MEMBERS)

    # -- raw input -------------------------------------------------------
    def _read_src(self, n: int) -> bytes:
        if self._eof:
            return b""
        data = self._src.read(n)
        if not data:
            self._eof = True
            return b""
        self.total += len(data)
        if self._on_bytes is not None:
            self._on_bytes(data)
        return data

    def _fill(self, n: int) -> bool:
        """Make at least ``n`` unread bytes available; False if the stream ends first."""
        avail = len(self._buf) - self._pos
        if avail >= n:
            return True
        parts = [self._buf[self._pos :]]
        while avail < n:
            chunk = self._read_src(max(_READ_CHUNK, n - avail))
            if not chunk:
                self._buf = b"".join(parts)
                self._pos = 0
                return False
            parts.append(chunk)
            avail += len(chunk)
        self._buf = b"".join(parts)
        self._pos = 0
        return True

    def _take(self, n: int) -> bytes:
        start = self._pos
        self._pos = start + n
        self.offset += n
        return self._buf[start : start + n]

    def _skip(self, n: int, what: str) -> None:
        if len(self._buf) - self._pos >= n:  # the usual padding: within the buffer
            self._pos += n
            self.offset += n
            return
        while n > 0:
            avail = len(self._buf) - self._pos
            if avail == 0:
                if not self._fill(1):
                    raise _bad(f"stream ends inside {what}")
                avail = len(self._buf) - self._pos
            step = min(avail, n)
            self._pos += step
            self.offset += step
            n -= step

    def _read_exact(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise _bad(f"stream ends inside {what}")
        return self._take(n)

    # -- member data -----------------------------------------------------
    @property
    def remaining(self) -> int:
        """Unread data bytes of the current member."""
        return self._remaining

    def read_data(self, limit: int = _READ_CHUNK) -> memoryview:
        """Up to ``limit`` bytes of the current member's data; empty at its end.

        Raises InvalidArgument if the stream ends before the member's data does.
        """
        n = self._remaining
        if limit < n:
            n = limit
        if n <= 0:
            return memoryview(b"")
        start = self._pos
        avail = len(self._buf) - start
        if avail == 0:
            chunk = self._read_src(max(n, _READ_CHUNK) if n < _READ_CHUNK else n)
            if not chunk:
                raise _bad(f"stream ends inside member data ({self._remaining} bytes missing)")
            self._buf = chunk
            start = 0
            avail = len(chunk)
        if avail < n:
            n = avail
        self._pos = start + n
        self.offset += n
        self._remaining -= n
        return memoryview(self._buf)[start : start + n]

    def _finish_member(self) -> None:
        if self._remaining:
            self._skip(self._remaining, "member data")
            self._remaining = 0
        if self._padding:
            self._skip(self._padding, "member padding")
            self._padding = 0

    def _read_meta(self, size: int, what: str) -> bytes:
        if size > MAX_META_SIZE:
            raise _bad(f"{what} of {size} bytes exceeds the {MAX_META_SIZE} byte limit")
        data = self._read_exact(size, what)
        self._skip(-size % BLOCK, f"{what} padding")
        return data

    # -- headers ---------------------------------------------------------
    def next(self) -> TarEntry | None:
        """The next real member, or None at the end of the archive."""
        if self._ended:
            return None
        if self._remaining or self._padding:
            self._finish_member()
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        chain = 0
        meta_bytes = 0  # x/L/K bytes in front of this member
        while True:
            pos = self._pos
            if len(self._buf) - pos < BLOCK:
                if not self._fill(BLOCK):
                    if len(self._buf) - self._pos == 0:
                        if chain:
                            raise _bad("stream ends after a metadata member")
                        self._ended = True  # no end-of-archive blocks: accepted
                        return None
                    raise _bad("stream ends inside a header block")
                pos = 0
            block = self._buf[pos : pos + BLOCK]
            self._pos = pos + BLOCK
            self.offset += BLOCK
            if block == _ZERO_BLOCK:
                if chain:
                    raise _bad("end of archive right after a metadata member")
                self._ended = True
                return None
            stored = _octal(block[148:156], "checksum")
            # adler32's low half is 1 + the sum of the bytes modulo 65521: exact
            # for 256 bytes (at most 65280), and a C loop where sum() makes 512 ints
            unsigned = ((adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF)
                        - 2 - sum(block[148:156]) + 8 * 32)
            if stored != unsigned:
                signed = unsigned - sum(256 for b in block if b > 127)
                signed += sum(256 for b in block[148:156] if b > 127)
                if stored != signed:
                    raise _bad(f"header checksum mismatch at offset {self.offset - BLOCK}")
            tflag = _TYPE_FLAGS[block[156]]
            size = _octal(block[124:136], "size")
            if size < 0 or size > MAX_MEMBER_SIZE:
                raise _bad(f"member size {size} out of range (limit {MAX_MEMBER_SIZE})")
            if tflag in ("x", "g", "L", "K"):
                chain += 1
                if chain > _MAX_META_CHAIN:
                    raise _bad("too many metadata members in a row")
                if tflag != "g":
                    meta_bytes += size
                    if meta_bytes > MAX_META_SIZE:
                        raise _bad(f"metadata of one member exceeds the {MAX_META_SIZE} "
                                   "byte limit")
                data = self._read_meta(size, f"'{tflag}' metadata member")
                if tflag == "x":
                    pax.update(parse_pax(data))
                elif tflag == "g":
                    self._global_bytes += len(data)
                    if self._global_bytes > _MAX_GLOBAL_BYTES:
                        raise _bad("PAX global headers exceed the size limit")
                    recs = parse_pax(data)
                    for k in ("path", "linkpath", "size"):
                        recs.pop(k, None)
                    self._global.update(recs)
                elif tflag == "L":
                    long_name = data.rstrip(b"\0")
                else:
                    long_link = data.rstrip(b"\0")
                continue
            entry = self._entry(block, tflag, size, pax, long_name, long_link)
            if entry is None:
                # a member lamina ignores (volume label): skip it and go on
                self._remaining = size
                self._padding = -size % BLOCK
                self._finish_member()
                pax, long_name, long_link, chain, meta_bytes = {}, None, None, 0, 0
                continue
            self.members += 1
            if self.members > limits.MAX_MEMBERS:
                raise ResourceExhausted(
                    f"layer has more than {limits.MAX_MEMBERS} members, the limit "
                    f"(what an unpack keeps grows with them)")
            return entry

    def _entry(
        self,
        block: bytes,
        tflag: str,
        size: int,
        pax: dict[str, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarEntry | None:
        if long_name is not None:
            name_b = long_name
        else:
            name_b = block[:100].split(b"\0", 1)[0]
            if block[257:263] == b"ustar\0":
                prefix = block[345:500].split(b"\0", 1)[0]
                if prefix:
                    name_b = prefix + b"/" + name_b
        link_b = long_link if long_link is not None else block[157:257].split(b"\0", 1)[0]
        owner = _OWNERS.get(block[100:124])
        if owner is None:
            owner, mtime_s = _owner_mtime(block)
        else:
            seen = _SEEN.get(block[136:148])
            mtime_s = _octal_seen(block[136:148], "mtime") if seen is None else seen
        raw_mode, uid, gid = owner
        entry = TarEntry("", tflag, size, raw_mode & 0o7777, uid, gid, mtime_s * 1_000_000_000,
                         is_socket=(raw_mode & _S_IFMT) == _S_IFSOCK)
        if tflag in "34":
            entry.devmajor = _octal(block[329:337], "devmajor")
            entry.devminor = _octal(block[337:345], "devminor")
        if self._global:
            self._apply_pax(entry, self._global)
        if pax:
            if "path" in pax:
                name_b = pax["path"]
            if "linkpath" in pax:
                link_b = pax["linkpath"]
            if "size" in pax:
                entry.size = _decimal(pax["size"], "size")
                if entry.size > MAX_MEMBER_SIZE:
                    raise _bad(f"member size {entry.size} out of range (limit {MAX_MEMBER_SIZE})")
            self._apply_pax(entry, pax)
        if len(name_b) > _SHORT_NAME:
            _check_path(name_b, "member name", True)
        if b"\0" in name_b:  # (what _name says, without the call)
            raise _bad("member name contains a NUL byte")
        entry.name = name_b.decode(_FS_ENCODING, _FS_ERRORS)
        if not entry.name:
            raise _bad("member with an empty name")
        if link_b:
            if len(link_b) > _SHORT_NAME:
                _check_path(link_b, f"{show_name(entry.name)}: link target", tflag == "1")
            entry.linkname = _name(link_b, "link name")
        if (entry.xattrs or entry.devmajor or entry.devminor
                or not (0 <= entry.uid <= _MAX_ID and 0 <= entry.gid <= _MAX_ID
                        and 0 <= raw_mode <= _MAX_MODE and -_MAX_TIME_S <= mtime_s <= _MAX_TIME_S)):
            self._check_values(entry, raw_mode, mtime_s)  # the whole check, for its message
        if tflag in ("0", "7"):
            entry.type = TYPE_REGULAR
        elif tflag == "\0":
            entry.type = TYPE_DIR if entry.name.endswith("/") else TYPE_REGULAR
        elif tflag == "D":
            entry.type = TYPE_DIR
        elif tflag in _HEADER_ONLY:
            entry.size = 0
        elif tflag == "V":
            return None
        elif tflag == "S":
            raise _bad(f"{entry.name}: sparse members are not supported")
        else:
            raise _bad(f"{entry.name}: unsupported member type {tflag!r}")
        self._remaining = entry.size
        self._padding = -entry.size % BLOCK
        return entry

    @staticmethod
    def _check_values(e: TarEntry, raw_mode: int, mtime_s: int) -> None:
        """Numbers and xattrs no Linux filesystem could store (see the module docs)."""
        if not (0 <= e.uid <= limits.MAX_ID and 0 <= e.gid <= limits.MAX_ID):
            raise _bad(f"{_who(e)}: owner {e.uid}:{e.gid} out of range (0..{limits.MAX_ID})")
        if not 0 <= raw_mode <= limits.MAX_MODE:
            raise _bad(f"{_who(e)}: mode {raw_mode:#o} out of range (0..{limits.MAX_MODE:#o})")
        if abs(mtime_s) > limits.MAX_TIME_S:
            raise _bad(f"{_who(e)}: mtime {mtime_s} out of range (64-bit seconds)")
        if not (0 <= e.devmajor <= limits.MAX_DEVMAJOR
                and 0 <= e.devminor <= limits.MAX_DEVMINOR):
            raise _bad(f"{_who(e)}: device number {e.devmajor}:{e.devminor} out of range "
                       f"(major 0..{limits.MAX_DEVMAJOR}, minor 0..{limits.MAX_DEVMINOR})")
        if e.xattrs:
            if len(e.xattrs) > limits.MAX_XATTRS:
                raise _bad(f"{_who(e)}: {len(e.xattrs)} xattrs (limit {limits.MAX_XATTRS})")
            total = 0
            for key, value in e.xattrs.items():
                klen = len(key.encode("utf-8", "surrogateescape"))
                if klen > limits.MAX_XATTR_NAME:
                    raise _bad(f"{_who(e)}: xattr name {show_name(key, 40)} is {klen} bytes "
                               f"(limit {limits.MAX_XATTR_NAME})")
                if len(value) > limits.MAX_XATTR_VALUE:
                    raise _bad(f"{_who(e)}: xattr {show_name(key, 40)} value is {len(value)} "
                               f"bytes (limit {limits.MAX_XATTR_VALUE})")
                total += klen + len(value)
            if total > limits.MAX_XATTR_TOTAL:
                raise _bad(f"{_who(e)}: xattrs take {total} bytes (limit {limits.MAX_XATTR_TOTAL})")

    @staticmethod
    def _apply_pax(entry: TarEntry, recs: dict[str, bytes]) -> None:
        for key, value in recs.items():
            if key == "uid":
                entry.uid = _decimal(value, "uid")
            elif key == "gid":
                entry.gid = _decimal(value, "gid")
            elif key == "mtime":
                entry.mtime_ns = _pax_time_ns(value, "mtime")
            elif key == "atime":
                entry.atime_ns = _pax_time_ns(value, "atime")
            elif key == "SCHILY.devmajor":
                if entry.type in "34":
                    entry.devmajor = _decimal(value, "devmajor")
            elif key == "SCHILY.devminor":
                if entry.type in "34":
                    entry.devminor = _decimal(value, "devminor")
            elif key.startswith("SCHILY.xattr."):
                name = key[len("SCHILY.xattr.") :]
                if not name or "\0" in name:
                    raise _bad(f"bad xattr name {name!r}")
                entry.xattrs[name] = value
            elif key.startswith("GNU.sparse."):
                raise _bad("sparse members are not supported")
            elif key.startswith("LIBARCHIVE.xattr."):
                name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
                if not name or "\0" in name:
                    raise _bad(f"bad xattr name {name!r}")
                try:
                    entry.xattrs[name] = base64.b64decode(value + b"=" * (-len(value) % 4))
                except (binascii.Error, ValueError) as exc:
                    raise _bad(f"xattr {name!r}: bad base64 value") from exc

    def drain(self) -> int:
        """Consume the rest of the stream (for the digest); returns the bytes skipped."""
        self._ended = True
        skipped = len(self._buf) - self._pos
        self._buf = b""
        self._pos = 0
        while True:
            chunk = self._read_src(_READ_CHUNK)
            if not chunk:
                break
            skipped += len(chunk)
        self.offset += skipped
        return skipped
