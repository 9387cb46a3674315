"""The streaming tar reader and writer on their own."""

from __future__ import annotations

import base64
import io
import os
import tarfile

import pytest
from test_archive_support import file_, find_header, make_tar, set_field

from lamina.archive.tarstream import TYPE_DIR, TYPE_REGULAR, TarEntry, TarReader, parse_pax
from lamina.archive.tarwriter import TarWriter
from lamina.errors import InvalidArgument


def entries(raw: bytes) -> list[tuple[TarEntry, bytes]]:
    r = TarReader(io.BytesIO(raw))
    out = []
    while (e := r.next()) is not None:
        data = b""
        while r.remaining:
            data += bytes(r.read_data(7))  # odd chunk size on purpose
        out.append((e, data))
    r.drain()
    return out


def test_parse_pax_records() -> None:
    assert parse_pax(b"11 path=ab\n17 uid=123456789\n") == {"path": b"ab", "uid": b"123456789"}
    assert parse_pax(b"13 k=with=eq\n") == {"k": b"with=eq"}
    for bad in (b"10 path=ab\n", b"x path=ab\n", b"5 p=a\n", b"11 path=ab!", b"0 \n"):
        with pytest.raises(InvalidArgument):
            parse_pax(bad)


def test_global_header_and_libarchive_xattrs() -> None:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=tarfile.PAX_FORMAT,
        pax_headers={"uid": "4242", "SCHILY.xattr.user.g": "global", "path": "ignored"},
    ) as tf:
        ti = tarfile.TarInfo("a")
        ti.size = 3
        name = "user.caf%C3%A9"
        ti.pax_headers = {
            "LIBARCHIVE.xattr." + name: base64.b64encode(b"\x00\x01v").decode().rstrip("="),
            "atime": "12.5",
        }
        tf.addfile(ti, io.BytesIO(b"abc"))
        ti2 = tarfile.TarInfo("b")
        ti2.uid = 7
        tf.addfile(ti2)
    (a, data), (b, _) = entries(buf.getvalue())
    assert a.name == "a" and data == b"abc"
    assert a.uid == 4242 and b.uid == 4242  # global records apply to every member
    assert a.xattrs == {"user.g": b"global", "user.café": b"\x00\x01v"}
    assert a.atime_ns == 12_500_000_000


def test_gnu_base256_owner_and_v7_directory() -> None:
    raw = make_tar([file_("f", b"x"), file_("olddir/", b"")])
    at = find_header(raw, b"f")
    raw = set_field(raw, at, 108, 116, b"\x80" + (5_000_000_000 % (1 << 32)).to_bytes(7, "big"))
    at = find_header(raw, b"olddir/")
    raw = set_field(raw, at, 156, 157, b"\0")
    (f, _), (d, _) = entries(raw)
    assert f.uid == 5_000_000_000 % (1 << 32)
    assert f.type == TYPE_REGULAR
    assert d.type == TYPE_DIR


def test_header_only_types_ignore_size() -> None:
    # a symlink header claiming data: no data follows it in the stream
    raw = make_tar([file_("l"), file_("after", b"data")])
    at = find_header(raw, b"l")
    raw = set_field(raw, at, 156, 157, b"2")
    raw = set_field(raw, at, 124, 136, b"00000001000\0")
    got = entries(raw)
    assert [(e.name, e.type, d) for e, d in got] == [("l", "2", b""), ("after", "0", b"data")]


def test_signed_checksum_accepted() -> None:
    raw = bytearray(make_tar([file_("\u00e9t\u00e9", b"x")]))  # non-ASCII name via PAX
    at = 0
    while raw[at + 156 : at + 157] != b"0":
        at += 512
    name = "é".encode("latin-1")
    raw[at : at + 1] = name
    block = raw[at : at + 512]
    signed = sum(b - 256 if b > 127 else b for b in block[:148]) + 8 * 32
    signed += sum(b - 256 if b > 127 else b for b in block[156:])
    raw[at + 148 : at + 156] = b"%06o\0 " % signed
    assert len(entries(bytes(raw))) == 1


def test_checksum_is_the_exact_byte_sum() -> None:
    # bytes above 127 in every part of the header; a sum off by a multiple of
    # 65521 (what a modular checksum would confuse) is refused
    raw = bytearray(make_tar([file_("f", b"x")]))
    at = find_header(bytes(raw), b"f")
    raw[at + 2 : at + 100] = b"\xff" * 98  # after the name's NUL
    raw[at + 157 : at + 257] = b"\0" + b"\xfe" * 99  # after the link name's NUL
    raw[at + 257 : at + 263] = b"ustar\0"
    raw[at + 265 : at + 345] = b"\xfc" * 80  # user and group names
    raw[at + 345 : at + 500] = b"\xfd" * 154 + b"\0"  # the prefix
    block = raw[at : at + 512]
    unsigned = sum(block[:148]) + sum(block[156:]) + 8 * 32
    for claimed, ok in ((unsigned, True), (unsigned + 65521, False), (unsigned - 65521, False)):
        raw[at + 148 : at + 156] = b"%06o\0 " % claimed
        if ok:
            assert len(entries(bytes(raw))) == 1
        else:
            with pytest.raises(InvalidArgument, match="header checksum mismatch"):
                entries(bytes(raw))


def test_writer_roundtrip_through_tarfile() -> None:
    chunks: list[bytes] = []
    w = TarWriter(chunks.append)
    r, wfd = os.pipe()
    os.write(wfd, b"hello")
    os.close(wfd)
    w.add("dir", "5", mode=0o755, uid=1, gid=2, mtime_ns=1_500_000_000_123_456_789)
    w.add(
        "dir/" + "n" * 150,
        "0",
        mode=0o4755,
        uid=3_000_000,
        gid=2,
        mtime_ns=-5,
        size=5,
        data_fd=r,
        xattrs={"user.k": b"\xff"},
    )
    w.add("dir/l", "2", mode=0o777, uid=0, gid=0, mtime_ns=0, linkname="t" * 120)
    w.close()
    os.close(r)
    raw = b"".join(chunks)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["dir", "dir/" + "n" * 150, "dir/l"]
        assert members[1].uid == 3_000_000 and members[1].mode == 0o4755
        assert tf.extractfile(members[1]).read() == b"hello"  # type: ignore[union-attr]
        assert members[2].linkname == "t" * 120
    got = entries(raw)
    assert got[0][0].mtime_ns == 1_500_000_000_123_456_789
    assert got[1][0].mtime_ns == -5
    assert got[1][0].xattrs == {"user.k": b"\xff"}
