"""write_diff / write_overlay_diff round trips, and overlay-mode apply on a real overlay mount."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ended_within
from test_archive_support import (
    CAP_NET_BIND,
    apply_bytes,
    dev,
    dir_,
    fifo,
    file_,
    hardlink,
    make_tar,
    symlink,
    tree_state,
)

from lamina.archive import apply_layer, write_diff, write_overlay_diff
from lamina.archive.tarstream import TarReader
from lamina.mounts.mount import Mount, mount_all, unmount_all

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def base_layer() -> bytes:
    return make_tar(
        [
            dir_("etc", mtime="1600000000.25"),
            file_("etc/passwd", b"root:x:0:0\n", mtime="1600000000.111111111"),
            file_("etc/shadow", b"secret", mode=0o600),
            file_("etc/hosts", b"127.0.0.1 localhost\n"),
            hardlink("etc/hosts-link", "etc/hosts"),
            dir_("bin"),
            file_("bin/sh", b"\x7fELF sh", mode=0o755),
            file_(
                "bin/ping",
                b"\x7fELF ping",
                mode=0o755,
                xattrs={"security.capability": CAP_NET_BIND},
            ),
            dir_("var"),
            dir_("var/cache"),
            file_("var/cache/a", b"a"),
            dir_("var/cache/deep"),
            file_("var/cache/deep/b", b"b"),
            file_("f2d", b"file"),
            dir_("d2f"),
            file_("d2f/x", b"x"),
            symlink("lnk", "etc/passwd"),
            file_("samesize", b"AAAA", mtime=1_600_000_123),
            file_("xfile", b"x", xattrs={"user.one": b"1"}),
            dir_("opq"),
            file_("opq/lower", b"l"),
            dev("null", 1, 3, mode=0o666),
            fifo("fifo"),
        ]
    )


def build_base(path: Path) -> Path:
    path.mkdir()
    apply_bytes(base_layer(), path)
    return path


def without_root(state: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    return {k: v for k, v in state.items() if k != "."}


def mutate(b: Path) -> None:
    (b / "etc/passwd").write_bytes(b"root:x:0:0\nuser:x:1000:1000\n")
    os.chmod(b / "bin/sh", 0o4755)
    os.chown(b / "bin/sh", 12, 34)
    os.chmod(b / "bin/sh", 0o4755)
    os.unlink(b / "etc/shadow")
    shutil.rmtree(b / "var/cache")
    os.unlink(b / "f2d")
    os.mkdir(b / "f2d", 0o750)
    (b / "f2d/child").write_bytes(b"child")
    shutil.rmtree(b / "d2f")
    (b / "d2f").write_bytes(b"was a dir")
    os.unlink(b / "lnk")
    os.symlink("bin/sh", b / "lnk")
    os.link(b / "etc/hosts", b / "newhard")
    os.link(b / "etc/hosts", b / "aaa-link")
    os.setxattr(b / "xfile", "user.two", b"\x00\x01")
    os.removexattr(b / "xfile", "user.one")
    (b / "samesize").write_bytes(b"BBBB")
    os.utime(b / "samesize", ns=(1_600_000_123 * 10**9,) * 2)
    os.mknod(b / "newdev", stat.S_IFBLK | 0o640, os.makedev(7, 1))
    os.mkfifo(b / "newfifo", 0o600)
    os.mkdir(b / "newdir", 0o2770)
    os.chown(b / "newdir", 5, 6)
    os.chmod(b / "newdir", 0o2770)
    (b / "newdir/file").write_bytes(os.urandom(300_000))
    os.utime(b / "newdir/file", ns=(1, 1_234_567_890_123_456_789))


def test_double_walk_roundtrip(tmp_path: Path) -> None:
    a = build_base(tmp_path / "a")
    b = build_base(tmp_path / "b")
    mutate(b)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(b / "sock"))
        for kind in ("gzip", "zstd", "none"):
            target = build_base(tmp_path / f"target-{kind}")
            out = io.BytesIO()
            res = write_diff(a, b, out, compression=kind)
            assert res.size == len(out.getvalue())
            applied = apply_layer(io.BytesIO(out.getvalue()), target)
            assert applied.diff_id == res.diff_id
            assert applied.size == res.uncompressed_size
            expected = without_root(tree_state(b))
            del expected["sock"]
            assert without_root(tree_state(target)) == expected
            if kind == "none":
                assert res.digest == res.diff_id


def test_double_walk_is_deterministic_and_minimal(tmp_path: Path) -> None:
    a = build_base(tmp_path / "a")
    b = build_base(tmp_path / "b")
    outs = []
    for _ in range(2):
        out = io.BytesIO()
        write_diff(a, b, out, compression="gzip")
        outs.append(out.getvalue())
    assert outs[0] == outs[1]
    # identical trees: an empty layer (just the end-of-archive blocks)
    out = io.BytesIO()
    res = write_diff(a, b, out, compression="none")
    assert out.getvalue() == bytes(1024)
    assert res.uncompressed_size == 1024


def member_names(blob: bytes) -> list[str]:
    from lamina.archive.compression import open_decompressed

    names = []
    with open_decompressed(io.BytesIO(blob)) as plain:
        r = TarReader(plain)
        while (e := r.next()) is not None:
            names.append(e.name)
    return names


def test_double_walk_members(tmp_path: Path) -> None:
    a = build_base(tmp_path / "a")
    b = build_base(tmp_path / "b")
    os.unlink(b / "etc/shadow")
    (b / "var/cache/deep/new").write_bytes(b"n")
    out = io.BytesIO()
    write_diff(a, b, out, compression="none")
    names = member_names(out.getvalue())
    # parents first, whiteouts as .wh. entries; unchanged siblings not written
    assert names == [
        "etc/",
        "etc/.wh.shadow",
        "var/",
        "var/cache/",
        "var/cache/deep/",
        "var/cache/deep/new",
    ]


def test_diff_from_nothing(tmp_path: Path) -> None:
    b = build_base(tmp_path / "b")
    target = tmp_path / "t"
    target.mkdir()
    out = io.BytesIO()
    write_diff(None, b, out, compression="zstd")
    apply_layer(io.BytesIO(out.getvalue()), target)
    assert without_root(tree_state(target)) == without_root(tree_state(b))


@contextmanager
def overlay(lower: Path, upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    for p in (upper, work, merged):
        p.mkdir(exist_ok=True)
    m = Mount(
        "overlay",
        "overlay",
        options=(f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"),
    )
    mount_all([m], merged)
    try:
        yield merged
    finally:
        unmount_all(merged)


def test_overlay_diff_roundtrip(tmp_path: Path) -> None:
    lower = build_base(tmp_path / "lower")
    upper = tmp_path / "upper"
    with overlay(lower, upper, tmp_path / "work", tmp_path / "merged") as m:
        mutate(m)
        # remove and re-create a lower directory: overlay makes it opaque
        shutil.rmtree(m / "opq")
        os.mkdir(m / "opq")
        (m / "opq/upper").write_bytes(b"u")
        merged_state = without_root(tree_state(m))
    assert stat.S_ISCHR(os.lstat(upper / "etc/shadow").st_mode)
    assert os.getxattr(upper / "opq", "trusted.overlay.opaque") == b"y"
    for kind in ("gzip", "zstd"):
        out = io.BytesIO()
        res = write_overlay_diff(upper, out, compression=kind)
        names = member_names(out.getvalue())
        assert "etc/.wh.shadow" in names
        assert "var/.wh.cache" in names
        assert names.index("opq/.wh..wh..opq") == names.index("opq/") + 1
        target = build_base(tmp_path / f"target-{kind}")
        applied = apply_layer(io.BytesIO(out.getvalue()), target)
        assert applied.diff_id == res.diff_id
        assert without_root(tree_state(target)) == merged_state
        for p in target.rglob("*"):
            assert not any(
                x.startswith("trusted.overlay.") for x in os.listxattr(p, follow_symlinks=False)
            )


def overlay_layer() -> bytes:
    return make_tar(
        [
            dir_("etc", mtime="1700000000.5"),
            file_("etc/.wh.shadow", b""),
            file_("etc/new", b"new", uid=9, gid=9),
            dir_("var", mtime=1_700_000_001),
            file_("var/.wh.cache", b""),
            dir_("opq", mode=0o700, mtime=1_700_000_002),
            dir_("opq/sub", mtime=1_700_000_004),
            file_("opq/sub/f", b"f"),
            file_("opq/.wh..wh..opq", b""),
            file_("opq/after", b"after"),
            dir_("f2d", mtime=1_700_000_003),
            file_("f2d/inside", b"i"),
            dir_("d2f-dir"),
            file_("d2f", b"file over dir"),
            hardlink("hl", "etc/new"),
            dir_("bin", mtime=1_600_000_000),
            file_("bin/sh", b"new sh", mode=0o4711, xattrs={"security.capability": CAP_NET_BIND}),
        ]
    )


def test_overlay_apply_matches_plain_apply(tmp_path: Path) -> None:
    layer = overlay_layer()
    # plain apply onto a copy of the lower
    plain = build_base(tmp_path / "plain")
    apply_bytes(layer, plain)
    expected = without_root(tree_state(plain))
    # overlay apply into an empty upper, then look through the mount
    lower = build_base(tmp_path / "lower")
    upper = tmp_path / "upper"
    upper.mkdir()
    res = apply_bytes(layer, upper, overlay=True)
    assert stat.S_ISCHR(os.lstat(upper / "etc/shadow").st_mode)
    assert os.lstat(upper / "etc/shadow").st_rdev == 0
    assert os.getxattr(upper / "opq", "trusted.overlay.opaque") == b"y"
    assert (lower / "var/cache/a").exists()  # lowers untouched
    with overlay(lower, upper, tmp_path / "work", tmp_path / "merged") as m:
        got = without_root(tree_state(m))
    assert got == expected
    assert res.diff_id.startswith("sha256:")


def test_a_file_that_changes_under_the_writer_is_failed_precondition(tmp_path: Path) -> None:
    """What the walk listed as a regular file may be something else, or shorter, by
    the time its data is read (a running container's tree): the layer writer is
    given the listing's stat and the entry as it is now. A FIFO there blocked the
    writer for ever (``open`` waited for a writer end); a file that shrank was an
    Internal error. Both are FailedPrecondition now, naming the entry."""
    from lamina.archive.layerwriter import Member, write_layer
    from lamina.errors import FailedPrecondition

    listed = tmp_path / "listed"
    listed.write_bytes(b"x" * 4096)
    st = os.lstat(listed)
    os.mkfifo(tmp_path / "swapped")
    (tmp_path / "shrunk").write_bytes(b"x" * 100)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, words in (("swapped", "changed while the layer was being written"),
                            ("shrunk", "shrank while the layer was being written")):
            member = Member(f"etc/{name}", st, (dir_fd, name), {})
            raised = ended_within(
                10, lambda m=member: write_layer([m], io.BytesIO(), compression="none"),
                f"writing {name}")
            assert isinstance(raised, FailedPrecondition), raised
            assert words in str(raised) and f"etc/{name}" in str(raised)
    finally:
        os.close(dir_fd)


def test_a_file_named_like_a_whiteout_cannot_go_into_a_layer(tmp_path: Path) -> None:
    """A file a container made named ``.wh.keep`` (or the opaque marker's name) means
    "delete keep" (or "hide the lower directory") once in a layer: written as it was,
    it deleted its sibling wherever the layer was applied. A diff that meets one
    is FailedPrecondition naming it, whichever walk found it."""
    from lamina.errors import FailedPrecondition

    for name in (".wh.keep", ".wh..wh..opq"):
        tree = tmp_path / name.replace(".", "_") / "upper"
        (tree / "data").mkdir(parents=True)
        (tree / "data" / "keep").write_text("kept\n")
        (tree / "data" / name).write_text("a file, not a whiteout\n")
        for diff in (lambda out, t=tree: write_diff(None, t, out, compression="none"),
                     lambda out, t=tree: write_overlay_diff(t, out, compression="none")):
            with pytest.raises(FailedPrecondition, match=f"data/{re.escape(name)}"):
                diff(io.BytesIO())
