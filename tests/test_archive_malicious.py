"""Hostile and broken layers: each raises InvalidArgument and writes nothing outside root."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from test_archive_support import (
    apply_bytes,
    dir_,
    file_,
    find_header,
    hardlink,
    make_tar,
    set_field,
    symlink,
    tree_state,
)

from lamina.archive.tarwriter import TarWriter
from lamina.errors import InvalidArgument

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def raw_tar(build: Callable[[TarWriter], None]) -> bytes:
    """A tar written by lamina's own writer, which writes names exactly as given."""
    chunks: list[bytes] = []
    w = TarWriter(chunks.append)
    build(w)
    w.close()
    return b"".join(chunks)


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """``root`` to apply into and ``outside`` next to it, holding a sentinel file."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "file").write_bytes(b"precious")
    (outside / "sub").mkdir()
    return root, outside


def _reject(sandbox: tuple[Path, Path], layer: bytes, match: str) -> None:
    root, outside = sandbox
    before = tree_state(outside.parent / "outside")
    parent_before = sorted(os.listdir(outside.parent))
    with pytest.raises(InvalidArgument, match=match):
        apply_bytes(layer, root)
    assert tree_state(outside) == before
    assert (outside / "file").read_bytes() == b"precious"
    assert sorted(os.listdir(outside.parent)) == parent_before


def test_dotdot_escape(sandbox: tuple[Path, Path]) -> None:
    _reject(sandbox, make_tar([file_("../outside/evil", b"x")]), "escapes the root")
    _reject(sandbox, make_tar([file_("a/../../outside/evil", b"x")]), "escapes the root")
    _reject(sandbox, make_tar([dir_("../outside/newdir")]), "escapes the root")
    _reject(sandbox, make_tar([symlink("../outside/l", "/")]), "escapes the root")


def test_absolute_path_is_inside_root(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    apply_bytes(make_tar([file_("/etc/x", b"in"), file_(str(outside / "abs"), b"in")]), root)
    assert (root / "etc/x").read_bytes() == b"in"
    assert (root / str(outside).lstrip("/") / "abs").read_bytes() == b"in"
    assert not (outside / "abs").exists()


def _contained(sandbox: tuple[Path, Path], layer: bytes) -> Path:
    """Apply ``layer``; nothing outside changes. Returns where the root keeps
    the outside directory's absolute path (a symlink to it is read inside the root)."""
    root, outside = sandbox
    before = tree_state(outside)
    parent_before = sorted(os.listdir(outside.parent))
    apply_bytes(layer, root)
    assert tree_state(outside) == before
    assert (outside / "file").read_bytes() == b"precious"
    assert sorted(os.listdir(outside.parent)) == parent_before
    return root / str(outside).lstrip("/")


def test_absolute_symlink_parent_stays_in_the_root(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    inside = _contained(sandbox, make_tar([symlink("link", str(outside)),
                                           file_("link/evil", b"x"),
                                           dir_("link/sub/deeper")]))
    assert (inside / "evil").read_bytes() == b"x"
    assert (inside / "sub/deeper").is_dir()
    assert os.readlink(root / "link") == str(outside)


def test_symlink_parent_leading_out_is_rejected(sandbox: tuple[Path, Path]) -> None:
    layer = make_tar([symlink("link", "../../.."), file_("link/evil", b"x")])
    _reject(sandbox, layer, "leads out of the root")
    layer = make_tar([dir_("d"), symlink("d/up", "../../outside"), file_("d/up/file", b"pwn")])
    _reject(sandbox, layer, "leads out of the root")
    # a chain whose second hop leaves
    layer = make_tar([symlink("a", "b/c"), symlink("b", "../outside"), file_("a/f", b"pwn")])
    _reject(sandbox, layer, "leads out of the root")
    _reject(sandbox, make_tar([symlink("x", "y"), symlink("y", "x"), file_("x/f", b"")]),
            "too many levels of symbolic links")
    _reject(sandbox, make_tar([symlink("loop", "loop/a"), file_("loop/f", b"")]),
            "too many levels of symbolic links")


def test_symlink_parent_from_lower_layer(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    os.symlink(str(outside), root / "lowerlink")
    inside = _contained(sandbox, make_tar([file_("lowerlink/file", b"pwn")]))
    assert (inside / "file").read_bytes() == b"pwn"
    os.symlink("../outside", root / "lowerrel")
    _reject(sandbox, make_tar([file_("lowerrel/file", b"pwn")]), "leads out of the root")


def test_hardlink_outside(sandbox: tuple[Path, Path]) -> None:
    _, outside = sandbox
    _reject(sandbox, make_tar([hardlink("h", "../outside/file")]), "outside the root")
    # an absolute target is inside the root, where it does not exist
    _reject(sandbox, make_tar([hardlink("h", str(outside / "file"))]), "does not exist")
    _reject(sandbox, make_tar([hardlink("h", "missing")]), "does not exist")
    # through a symlink to the outside's path: read inside the root, where it does not exist
    layer = make_tar([symlink("l", str(outside)), hardlink("h", "l/file")])
    _reject(sandbox, layer, "does not exist")
    layer = make_tar([symlink("l", "../outside"), hardlink("h", "l/file")])
    _reject(sandbox, layer, "leads out of the root")
    _reject(sandbox, make_tar([dir_("d"), hardlink("h", "d")]), "is a directory")


def test_hardlink_to_symlink_links_the_symlink(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    apply_bytes(make_tar([symlink("l", str(outside / "file")), hardlink("h", "l")]), root)
    assert os.readlink(root / "h") == str(outside / "file")
    assert os.lstat(root / "h").st_ino == os.lstat(root / "l").st_ino


def test_bad_whiteouts(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    _reject(sandbox, make_tar([file_(".wh..", b"")]), "does not name")
    _reject(sandbox, make_tar([file_(".wh...", b"")]), "does not name")
    _reject(sandbox, make_tar([file_(".wh.", b"")]), "does not name")
    _reject(sandbox, make_tar([file_("../.wh.outside", b"")]), "escapes the root")
    _reject(sandbox, make_tar([file_("../outside/.wh.file", b"")]), "escapes the root")
    _reject(sandbox, make_tar([dir_(".wh.dir")]), "cannot be a directory")
    _reject(sandbox, make_tar([file_(".wh.x/child", b"")]), "through whiteout")
    layer = make_tar([symlink("l", "../outside"), file_("l/.wh.file", b"")])
    _reject(sandbox, layer, "leads out of the root")
    layer = make_tar([symlink("l", "../outside"), file_("l/.wh..wh..opq", b"")])
    _reject(sandbox, layer, "leads out of the root")
    # through a symlink to the outside's absolute path: whites out inside the root only
    _contained(sandbox, make_tar([symlink("l", str(outside)), file_("l/.wh.file", b""),
                                  file_("l/.wh..wh..opq", b"")]))
    # a whiteout naming a symlink removes the link, never its target
    os.symlink(str(outside), root / "tolink")
    apply_bytes(make_tar([file_(".wh.tolink", b"")]), root)
    assert not os.path.lexists(root / "tolink")
    assert (outside / "file").read_bytes() == b"precious"


def test_overlay_mode_is_as_strict(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    for target in (str(outside), "../outside"):
        layer = make_tar([symlink("l", target), file_("l/.wh.file", b"")])
        with pytest.raises(InvalidArgument):
            apply_bytes(layer, root, overlay=True)
        assert (outside / "file").read_bytes() == b"precious"
        assert sorted(os.listdir(outside)) == ["file", "sub"]


def test_truncated_gzip(sandbox: tuple[Path, Path]) -> None:
    raw = make_tar([file_("f", os.urandom(200_000))])
    gz = gzip.compress(raw)
    _reject(sandbox, gz[: len(gz) // 2], "corrupt or truncated gzip")
    # only the trailer (CRC + length) missing: the tar itself is complete
    _reject(sandbox, gz[:-8], "corrupt or truncated gzip")
    bad = bytearray(gz)
    bad[-6] ^= 0xFF  # CRC mismatch
    _reject(sandbox, bytes(bad), "corrupt or truncated gzip")


@pytest.mark.parametrize("field", ["name", "comment", "extra"])
def test_a_gzip_header_too_large_to_hold(field: str, sandbox: tuple[Path, Path]) -> None:
    """A gzip header with a file name, comment or extra field larger than ISA-L's
    header buffer (a hostile registry's layer) made the decompressor raise
    OverflowError, which reached the user as ``internal error: OverflowError``,
    exit 1. It is a layer lamina cannot read: InvalidArgument, nothing written."""
    raw = make_tar([file_("f", b"data")])
    body = gzip.compress(raw)[10:]  # the deflate stream and trailer after a plain header
    flag, extra = {"name": (0x08, b"n" * (1 << 20) + b"\0"),
                   "comment": (0x10, b"c" * (1 << 20) + b"\0"),
                   "extra": (0x04, (0xFFFF).to_bytes(2, "little") + b"e" * 0xFFFF)}[field]
    header = b"\x1f\x8b\x08" + bytes([flag]) + b"\0\0\0\0\0\xff"
    layer = header + extra + body
    if field == "extra":  # 64 KiB, the most a gzip extra field holds, is readable
        root, _ = sandbox
        apply_bytes(layer, root)
        assert (root / "f").read_bytes() == b"data"
        return
    _reject(sandbox, layer, "corrupt or truncated gzip layer stream: .*header")


def test_truncated_zstd(sandbox: tuple[Path, Path]) -> None:
    raw = make_tar([file_("f", os.urandom(200_000))])
    z = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    _reject(sandbox, z[: len(z) // 2], "zstd")
    _reject(sandbox, z[:-2], "zstd")  # only the checksum cut
    _reject(sandbox, z + b"garbage!", "zstd")


def test_truncated_member_data(sandbox: tuple[Path, Path]) -> None:
    raw = make_tar([file_("f", b"A" * 10_000)], eoa=False)
    _reject(sandbox, raw[:5000], "ends inside member data")
    _reject(sandbox, raw[: len(raw) - 100], "ends inside member")  # inside the padding
    _reject(sandbox, raw[:300], "ends inside a header")


def test_bad_header_checksum(sandbox: tuple[Path, Path]) -> None:
    raw = bytearray(make_tar([file_("f", b"x")]))
    at = find_header(bytes(raw), b"f")
    raw[at + 10] ^= 0x01
    _reject(sandbox, bytes(raw), "checksum mismatch")


def test_garbage_numbers(sandbox: tuple[Path, Path]) -> None:
    raw = make_tar([file_("f", b"x")])
    at = find_header(raw, b"f")
    _reject(sandbox, set_field(raw, at, 124, 136, b"12x4"), "not an octal number")


def test_absurd_size(sandbox: tuple[Path, Path]) -> None:
    raw = make_tar([file_("f", b"x")])
    at = find_header(raw, b"f")
    huge = b"\x80" + (10**15).to_bytes(11, "big")  # GNU base-256 size field
    _reject(sandbox, set_field(raw, at, 124, 136, huge), "out of range")
    neg = b"\xff" * 12
    _reject(sandbox, set_field(raw, at, 124, 136, neg), "out of range")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 1
        ti.pax_headers = {"size": str(10**15)}
        tf.addfile(ti, io.BytesIO(b"x"))
    _reject(sandbox, buf.getvalue(), "out of range")


def test_pax_bombs(sandbox: tuple[Path, Path]) -> None:
    big = make_tar([file_("f", b"x", xattrs={"user.big": b"A" * (3 << 20)})])
    _reject(sandbox, big, "exceeds")

    def bad_length(w: TarWriter) -> None:
        rec = b"99999999 path=x\n"
        w._emit(w._header(b"PaxHeader/f", "x", 0o644, 0, 0, 0, len(rec)))
        w._emit(rec + bytes(-len(rec) % 512))
        w.add("f", "0", mode=0o644, uid=0, gid=0, mtime_ns=0)

    _reject(sandbox, raw_tar(bad_length), "PAX record length")

    def chain(w: TarWriter) -> None:
        rec = b"16 comment=abcd\n"
        for _ in range(1000):
            w._emit(w._header(b"PaxHeader/f", "x", 0o644, 0, 0, 0, len(rec)))
            w._emit(rec + bytes(-len(rec) % 512))
        w.add("f", "0", mode=0o644, uid=0, gid=0, mtime_ns=0)

    _reject(sandbox, raw_tar(chain), "too many metadata")

    def no_equals(w: TarWriter) -> None:
        rec = b"11 pathxyz\n"
        w._emit(w._header(b"PaxHeader/f", "x", 0o644, 0, 0, 0, len(rec)))
        w._emit(rec + bytes(-len(rec) % 512))
        w.add("f", "0", mode=0o644, uid=0, gid=0, mtime_ns=0)

    _reject(sandbox, raw_tar(no_equals), "key=value")

    # a NUL in a PAX path (the ustar field stops at the NUL, the PAX record does not)
    def nul_pax(w: TarWriter) -> None:
        rec = b"12 path=a\0b\n"
        w._emit(w._header(b"PaxHeader/f", "x", 0o644, 0, 0, 0, len(rec)))
        w._emit(rec + bytes(-len(rec) % 512))
        w.add("f", "0", mode=0o644, uid=0, gid=0, mtime_ns=0)

    _reject(sandbox, raw_tar(nul_pax), "NUL")


def test_gnu_longname_bomb(sandbox: tuple[Path, Path]) -> None:
    def longname(w: TarWriter) -> None:
        size = 5 << 20
        w._emit(w._header(b"././@LongLink", "L", 0o644, 0, 0, 0, size))
        w._emit(b"a" * size)

    _reject(sandbox, raw_tar(longname), "exceeds")


def test_wrong_diff_id(sandbox: tuple[Path, Path]) -> None:
    raw = make_tar([file_("f", b"x")])
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    root, _ = sandbox
    with pytest.raises(InvalidArgument, match="diff id mismatch"):
        apply_bytes(gzip.compress(raw), root, expected_diff_id=wrong)


def test_unsupported_types(sandbox: tuple[Path, Path]) -> None:
    raw = make_tar([file_("f", b"x")])
    at = find_header(raw, b"f")
    _reject(sandbox, set_field(raw, at, 156, 157, b"S"), "sparse")
    _reject(sandbox, set_field(raw, at, 156, 157, b"Z"), "unsupported member type")


def test_parent_is_a_file(sandbox: tuple[Path, Path]) -> None:
    _reject(sandbox, make_tar([file_("f", b"x"), file_("f/g", b"y")]), "not a directory")


def test_xattrs_the_kernel_rejects_refuse_the_layer(sandbox: tuple[Path, Path]) -> None:
    """EINVAL from setxattr is the layer's fault (found by tests/test_fuzz.py, which
    saw it surface as Internal)."""
    cap = {"security.capability": b"\x01\x02"}  # too short to be a capability
    _reject(sandbox, make_tar([file_("f", b"x", xattrs=cap)]), "rejects xattr")
    _reject(sandbox, make_tar([dir_("d", xattrs=cap)]), "rejects xattr")


def test_symlink_with_an_empty_target(sandbox: tuple[Path, Path]) -> None:
    _reject(sandbox, make_tar([symlink("l", "")]), "empty target")


def test_hardlink_replacing_the_directory_that_holds_its_target(
        sandbox: tuple[Path, Path]) -> None:
    _reject(sandbox, make_tar([dir_("a"), file_("a/f", b"x"), hardlink("a", "a/f")]),
            "inside the directory the link replaces")
