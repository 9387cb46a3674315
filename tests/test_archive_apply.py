"""apply_layer: round trips, whiteouts, type changes, compression, DiffID."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import pytest
from test_archive_support import (
    CAP_NET_BIND,
    apply_bytes,
    compress,
    dev,
    dir_,
    fifo,
    file_,
    find_header,
    hardlink,
    make_tar,
    set_field,
    symlink,
    tree_state,
)

from lamina.archive import (
    Compression,
    compression_from_media_type,
    detect,
    media_type,
    open_decompressed,
)
from lamina.archive.compression import compressor
from lamina.errors import InvalidArgument

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NS = "1700000000.123456789"
NS_VAL = 1_700_000_000_123_456_789


def full_layer() -> bytes:
    return make_tar(
        [
            dir_("etc", mode=0o755, mtime=NS),
            file_(
                "etc/passwd",
                b"root:x:0:0\n",
                mode=0o644,
                uid=1000,
                gid=1001,
                mtime=NS,
                xattrs={"user.note": b"hi\x00there", "trusted.t": b"\xff\xfe"},
            ),
            file_(
                "bin-ping",
                b"\x7fELF...",
                mode=0o4755,
                uid=0,
                gid=0,
                xattrs={"security.capability": CAP_NET_BIND},
            ),
            file_("sgid", b"x", mode=0o2711, uid=70000, gid=4294967294),
            dir_("tmp", mode=0o1777, mtime="1500000000.5"),
            dir_("sgdir", mode=0o2775, gid=50),
            file_("sgdir/inner", b"inner", uid=5, gid=6),
            symlink("etc/link", "/etc/passwd", uid=7, gid=8, mtime=NS),
            symlink("dangling", "../../nowhere"),
            hardlink("etc/hard", "etc/passwd", uid=1000, gid=1001, mtime=NS),
            hardlink("hard2", "/etc/passwd", uid=1000, gid=1001, mtime=NS),
            dev("dev-null", 1, 3, mode=0o666),
            dev("dev-sda", 8, 0, block=True, mode=0o660, gid=6),
            fifo("pipe", mode=0o620),
            file_("empty", b"", mode=0o400),
            file_("big", os.urandom(3 * (1 << 20) + 17), mode=0o755),
            file_("a/b/c/deep", b"deep"),  # parents created implicitly
            dir_("ro", mode=0o555),
            file_("ro/inside", b"x", mode=0o444),
        ]
    )


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_roundtrip_all_kinds(tmp_path: Path, kind: str) -> None:
    raw = full_layer()
    root = tmp_path / "root"
    root.mkdir()
    res = apply_bytes(compress(raw, kind), root)
    assert res.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert res.size == len(raw)

    st = os.lstat(root / "etc/passwd")
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert st.st_mtime_ns == NS_VAL
    assert st.st_atime_ns == NS_VAL
    assert os.getxattr(root / "etc/passwd", "user.note") == b"hi\x00there"
    assert os.getxattr(root / "etc/passwd", "trusted.t") == b"\xff\xfe"
    assert (root / "etc/passwd").read_bytes() == b"root:x:0:0\n"

    ping = os.lstat(root / "bin-ping")
    assert stat.S_IMODE(ping.st_mode) == 0o4755
    assert os.getxattr(root / "bin-ping", "security.capability") == CAP_NET_BIND
    sg = os.lstat(root / "sgid")
    assert stat.S_IMODE(sg.st_mode) == 0o2711
    assert (sg.st_uid, sg.st_gid) == (70000, 4294967294)
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777
    assert os.lstat(root / "tmp").st_mtime_ns == 1_500_000_000_500_000_000
    assert os.lstat(root / "sgdir").st_gid == 50
    assert os.lstat(root / "sgdir/inner").st_gid == 6

    ln = os.lstat(root / "etc/link")
    assert stat.S_ISLNK(ln.st_mode)
    assert os.readlink(root / "etc/link") == "/etc/passwd"
    assert (ln.st_uid, ln.st_gid) == (7, 8)
    assert ln.st_mtime_ns == NS_VAL
    assert os.readlink(root / "dangling") == "../../nowhere"

    assert os.lstat(root / "etc/hard").st_ino == st.st_ino
    assert os.lstat(root / "hard2").st_ino == st.st_ino
    assert os.lstat(root / "etc/passwd").st_nlink == 3

    cdev = os.lstat(root / "dev-null")
    assert stat.S_ISCHR(cdev.st_mode) and cdev.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(cdev.st_mode) == 0o666
    bdev = os.lstat(root / "dev-sda")
    assert stat.S_ISBLK(bdev.st_mode) and bdev.st_rdev == os.makedev(8, 0)
    assert bdev.st_gid == 6
    p = os.lstat(root / "pipe")
    assert stat.S_ISFIFO(p.st_mode) and stat.S_IMODE(p.st_mode) == 0o620
    assert stat.S_IMODE(os.lstat(root / "empty").st_mode) == 0o400
    assert os.path.getsize(root / "big") == 3 * (1 << 20) + 17
    assert (root / "a/b/c/deep").read_bytes() == b"deep"
    assert stat.S_IMODE(os.lstat(root / "a/b").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(root / "ro").st_mode) == 0o555
    # directory times are set after their content was written
    assert os.lstat(root / "etc").st_mtime_ns == NS_VAL


def test_same_tree_from_every_compression(tmp_path: Path) -> None:
    raw = full_layer()
    states = []
    for kind in ("none", "gzip", "zstd"):
        root = tmp_path / kind
        root.mkdir()
        apply_bytes(compress(raw, kind), root)
        state = tree_state(root)
        for implicit in ("a", "a/b", "a/b/c"):  # created on the fly, with the current time
            state[implicit] = state[implicit][:4]
        states.append(state)
    assert states[0] == states[1] == states[2]


def test_no_end_of_archive_blocks(tmp_path: Path) -> None:
    raw = make_tar([dir_("d"), file_("d/f", b"data" * 1000)], eoa=False)
    assert not raw.endswith(bytes(1024))
    for kind in ("none", "gzip", "zstd"):
        root = tmp_path / kind
        root.mkdir()
        res = apply_bytes(compress(raw, kind), root)
        assert (root / "d/f").read_bytes() == b"data" * 1000
        assert res.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_diff_id_includes_trailing_bytes(tmp_path: Path) -> None:
    raw = make_tar([file_("f", b"x")]) + bytes(4096) + b"trailing junk"
    res = apply_bytes(compress(raw, "gzip"), tmp_path)
    assert res.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert res.size == len(raw)


def test_expected_diff_id_ok_and_progress(tmp_path: Path) -> None:
    raw = make_tar([file_("f", b"x" * 5000)])
    seen: list[int] = []
    good = "sha256:" + hashlib.sha256(raw).hexdigest()
    res = apply_bytes(compress(raw, "zstd"), tmp_path, expected_diff_id=good, progress=seen.append)
    assert res.diff_id == good
    assert seen and seen[-1] == len(raw)


def test_pax_long_names_and_gnu_longname(tmp_path: Path) -> None:
    import tarfile

    long = "d/" + "x" * 150 + "/" + "ü" * 120
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("g" * 150 + "/" + "h" * 150)
        ti.size = 2
        tf.addfile(ti, io.BytesIO(b"ok"))
        sl = tarfile.TarInfo("gl")
        sl.type = tarfile.SYMTYPE
        sl.linkname = "t" * 200
        tf.addfile(sl)
    apply_bytes(buf.getvalue(), tmp_path)
    assert (tmp_path / ("g" * 150) / ("h" * 150)).read_bytes() == b"ok"
    assert os.readlink(tmp_path / "gl") == "t" * 200
    apply_bytes(make_tar([file_(long, b"pax")]), tmp_path)
    assert (tmp_path / long).read_bytes() == b"pax"


# -- whiteouts ------------------------------------------------------------


def lower_layer() -> bytes:
    return make_tar(
        [
            dir_("keep"),
            file_("keep/a", b"a"),
            file_("keep/b", b"b"),
            dir_("gone"),
            file_("gone/x", b"x"),
            dir_("gone/sub"),
            file_("gone/sub/y", b"y"),
            dir_("opq"),
            file_("opq/lower1", b"1"),
            dir_("opq/lowerdir"),
            file_("opq/lowerdir/z", b"z"),
            dir_("opq/shared"),
            file_("opq/shared/lowerfile", b"l"),
            file_("f2d", b"file becomes dir"),
            dir_("d2f"),
            file_("d2f/child", b"c"),
            symlink("l2f", "keep/a"),
        ]
    )


def upper_layer() -> bytes:
    return make_tar(
        [
            file_("keep/.wh.a", b""),
            file_(".wh.gone", b""),
            dir_("opq"),
            file_("opq/new-before", b"nb"),
            dir_("opq/shared"),
            file_("opq/shared/upperfile", b"u"),
            file_("opq/.wh..wh..opq", b""),
            file_("opq/new-after", b"na"),
            dir_("f2d", mode=0o700),
            file_("f2d/inside", b"i"),
            file_("d2f", b"now a file"),
            file_("l2f", b"symlink became file"),
            file_(".wh.never-existed", b""),
            file_("nodir/.wh.x", b""),
        ]
    )


def test_whiteouts_and_opaque(tmp_path: Path) -> None:
    apply_bytes(lower_layer(), tmp_path)
    apply_bytes(compress(upper_layer(), "gzip"), tmp_path)
    assert not (tmp_path / "keep/a").exists()
    assert (tmp_path / "keep/b").read_bytes() == b"b"
    assert not (tmp_path / "gone").exists()
    names = sorted(os.listdir(tmp_path / "opq"))
    assert names == ["new-after", "new-before", "shared"]
    # the opaque directory also hides lower content below directories this layer re-created
    assert os.listdir(tmp_path / "opq/shared") == ["upperfile"]
    assert (tmp_path / "f2d").is_dir() and stat.S_IMODE(os.lstat(tmp_path / "f2d").st_mode) == 0o700
    assert (tmp_path / "f2d/inside").read_bytes() == b"i"
    assert (tmp_path / "d2f").read_bytes() == b"now a file"
    assert not os.path.islink(tmp_path / "l2f")
    assert not (tmp_path / "nodir").exists()


def test_later_entry_replaces_earlier(tmp_path: Path) -> None:
    raw = make_tar(
        [
            file_("x", b"first", mode=0o600),
            file_("x", b"second", mode=0o640),
            dir_("d", mode=0o700),
            file_("d/child", b"c"),
            dir_("d", mode=0o751, uid=3),  # dir over dir keeps contents, new metadata
            symlink("s", "a"),
            symlink("s", "b"),
            file_("h1", b"orig"),
            hardlink("h2", "h1"),
            file_("h2", b"replaced"),  # must not modify h1 through the link
        ]
    )
    apply_bytes(raw, tmp_path)
    assert (tmp_path / "x").read_bytes() == b"second"
    assert stat.S_IMODE(os.lstat(tmp_path / "x").st_mode) == 0o640
    assert (tmp_path / "d/child").read_bytes() == b"c"
    st = os.lstat(tmp_path / "d")
    assert stat.S_IMODE(st.st_mode) == 0o751 and st.st_uid == 3
    assert os.readlink(tmp_path / "s") == "b"
    assert (tmp_path / "h1").read_bytes() == b"orig"
    assert (tmp_path / "h2").read_bytes() == b"replaced"


def test_whiteout_of_entry_from_same_layer(tmp_path: Path) -> None:
    """Whiteouts apply to lower layers only (OCI layer.md): the same layer's entry stays."""
    apply_bytes(make_tar([dir_("d"), file_("d/f", b"lower"), file_("d/g", b"g")]), tmp_path)
    apply_bytes(make_tar([dir_("d"), file_("d/f", b"1"), file_("d/.wh.f", b""),
                          file_("d/.wh.g", b"")]), tmp_path)
    assert os.listdir(tmp_path / "d") == ["f"]
    assert (tmp_path / "d/f").read_bytes() == b"1"


def test_symlinked_parents_are_followed_inside_the_root(tmp_path: Path) -> None:
    """As a container sees its rootfs (and containerd applies layers): a member
    under a symlinked directory lands where the symlink leads; absolute targets
    start at the root; what the layer made is tracked by the resolved path."""
    apply_bytes(make_tar([
        dir_("usr"), dir_("usr/lib"), file_("usr/lib/old", b"old"), file_("usr/lib/keep", b"k"),
        symlink("lib", "usr/lib"), dir_("run"), dir_("var"), symlink("var/run", "/run"),
        dir_("opt"), dir_("opt/real"), file_("opt/real/stale", b"s"),
        symlink("opt/link", "real"), symlink("chain", "opt/link"),
    ]), tmp_path)
    apply_bytes(make_tar([
        file_("lib/through-rel", b"r"),
        file_("var/run/through-abs.pid", b"1"),
        file_("lib/.wh.old", b""),
        dir_("lib/newdir", mode=0o710, mtime=1_500_000_000),
        file_("lib/newdir/f", b"f"),
        hardlink("hl", "lib/keep"),
        file_("chain/via-chain", b"c"),
        file_("opt/link/.wh..wh..opq", b""),  # keeps only what this layer put in opt/real
    ]), tmp_path)
    assert os.readlink(tmp_path / "lib") == "usr/lib"
    assert os.readlink(tmp_path / "var/run") == "/run"
    assert sorted(os.listdir(tmp_path / "usr/lib")) == ["keep", "newdir", "through-rel"]
    assert (tmp_path / "run/through-abs.pid").read_bytes() == b"1"
    st = os.lstat(tmp_path / "usr/lib/newdir")
    assert stat.S_IMODE(st.st_mode) == 0o710 and st.st_mtime == 1_500_000_000
    assert os.lstat(tmp_path / "hl").st_ino == os.lstat(tmp_path / "usr/lib/keep").st_ino
    assert os.listdir(tmp_path / "opt/real") == ["via-chain"]
    assert os.readlink(tmp_path / "chain") == "opt/link"


def test_root_entry_and_sockets(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    raw = make_tar([dir_("./", mode=0o711, mtime=NS), file_("sock"), file_("f", b"1")])
    at = find_header(raw, b"sock")
    raw = set_field(raw, at, 100, 108, b"0140755\0")  # socket type bits: skipped
    apply_bytes(raw, root)
    st = os.lstat(root)
    assert stat.S_IMODE(st.st_mode) == 0o711 and st.st_mtime_ns == NS_VAL
    assert sorted(os.listdir(root)) == ["f"]


# -- compression helpers --------------------------------------------------


def test_detect_and_media_types() -> None:
    assert detect(b"\x1f\x8b\x08\x00") is Compression.GZIP
    assert detect(b"\x28\xb5\x2f\xfd") is Compression.ZSTD
    assert detect(b"ustar") is Compression.NONE
    assert media_type("gzip") == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert media_type("zstd") == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert media_type("none") == "application/vnd.oci.image.layer.v1.tar"
    assert media_type("gzip", docker=True) == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert (
        compression_from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip")
        is Compression.GZIP
    )
    assert compression_from_media_type(MT_ZSTD) is Compression.ZSTD
    with pytest.raises(InvalidArgument):
        compression_from_media_type("application/json")
    with pytest.raises(InvalidArgument):
        Compression.parse("lz4")


MT_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_compressor_roundtrip(kind: str) -> None:
    payload = os.urandom(1 << 16) * 20
    out = io.BytesIO()
    w = compressor(kind, out)
    for i in range(0, len(payload), 100_000):
        w.write(payload[i : i + 100_000])
    w.close()
    assert not out.closed
    out.seek(0)
    with open_decompressed(out) as r:
        assert r.compression.value == kind
        got = b"".join(iter(lambda: r.read(1 << 20), b""))
    assert got == payload


def test_multi_frame_zstd_and_multi_member_gzip(tmp_path: Path) -> None:
    import zstandard

    raw = make_tar([file_("f", os.urandom(100_000))])
    half = len(raw) // 2
    z = zstandard.ZstdCompressor().compress(raw[:half]) + zstandard.ZstdCompressor().compress(
        raw[half:]
    )
    g = compress(raw[:half], "gzip") + compress(raw[half:], "gzip")
    for i, blob in enumerate((z, g)):
        root = tmp_path / str(i)
        root.mkdir()
        assert apply_bytes(blob, root).diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
