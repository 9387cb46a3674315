"""What the erofs snapshotter adds to the conformance suite: images on disk, layer
mounts (file-backed and on a loop device), mounts after a reboot, streamed layers."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.archive.apply import NeedsLowerLayers
from lamina.errors import FailedPrecondition, InvalidArgument
from lamina.mounts.erofs import is_mounted, unmount_image
from lamina.mounts.mount import temp_mount
from lamina.mounts.mountinfo import read_mountinfo
from lamina.snapshots import LayerStreams, testsuite
from lamina.snapshots.erofs import IMAGE, ErofsSnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

LOOP_CASES = ("LayerFileUpdate", "RemoveDirectoryInLowerLayer", "ViewReadonly", "Hardlinks",
              "FileTypes", "Usage")


def _layer_mounts(base: Path) -> list[str]:
    return [m.source for m in read_mountinfo()
            if m.fstype == "erofs" and m.mount_point.startswith(str(base))]


@pytest.fixture
def sn(tmp_path: Path) -> Iterator[ErofsSnapshotter]:
    s = ErofsSnapshotter(tmp_path / "root")
    try:
        yield s
    finally:
        s.close()
        for m in sorted(read_mountinfo(), key=lambda m: -len(m.mount_point)):
            if m.mount_point.startswith(str(tmp_path)):
                unmount_image(m.mount_point)


def _commit(sn: ErofsSnapshotter, name: str, parent: str, files: dict[str, bytes],
            work: Path) -> None:
    key = f"{name}-active"
    with temp_mount(sn.prepare(key, parent), base=work) as root:
        for rel, data in files.items():
            Path(root, rel).parent.mkdir(parents=True, exist_ok=True)
            Path(root, rel).write_bytes(data)
    sn.commit(name, key)


@pytest.mark.parametrize("case", [p for p in testsuite.params() if p.id in LOOP_CASES])
def test_loop_device_backing(case: testsuite.Case, tmp_path: Path) -> None:
    """The path of kernels without file-backed EROFS mounts (bookworm's 6.1)."""
    testsuite.run(case, lambda root: ErofsSnapshotter(root, backing="loop"), tmp_path)


def test_loop_layers_are_loop_devices(tmp_path: Path) -> None:
    s = ErofsSnapshotter(tmp_path / "root", backing="loop")
    work = tmp_path / "work"
    try:
        _commit(s, "base", "", {"a": b"1"}, work)
        with temp_mount(s.view("v", "base"), base=work) as root:
            assert Path(root, "a").read_bytes() == b"1"
        sources = _layer_mounts(tmp_path)
        assert sources and all(src.startswith("/dev/loop") for src in sources), sources
        s.remove("v")
        s.remove("base")
        assert not _layer_mounts(tmp_path)
    finally:
        s.close()


def test_committed_layer_is_one_checked_image(sn: ErofsSnapshotter, tmp_path: Path) -> None:
    work = tmp_path / "work"
    _commit(sn, "base", "", {"etc/hostname": b"box\n", "big": b"x" * 100_000}, work)
    image = sn.image_path("base")
    assert image.is_file()
    assert sorted(os.listdir(image.parent)) == ["fs", IMAGE, "layer.sha256"]
    if shutil.which("fsck.erofs"):
        subprocess.run(["fsck.erofs", str(image)], check=True, capture_output=True)
    assert sn.verify_layer("base") == ""
    assert _layer_mounts(tmp_path) == [], "mounted on demand"
    _commit(sn, "top", "base", {"etc/hostname": b"other\n"}, work)
    with temp_mount(sn.view("v1", "top"), base=work) as r1, \
            temp_mount(sn.view("v2", "top"), base=work) as r2:
        assert Path(r1, "etc/hostname").read_bytes() == b"other\n"
        assert Path(r2, "big").stat().st_size == 100_000
    mounts = _layer_mounts(tmp_path)
    assert len(mounts) == 2, "each layer is mounted once, shared"
    assert str(image) in mounts  # file-backed on this kernel


def test_check_deep_sees_a_changed_image(sn: ErofsSnapshotter, tmp_path: Path) -> None:
    _commit(sn, "base", "", {"f": b"data"}, tmp_path / "work")
    image = sn.image_path("base")
    unmount_image(image.parent / "fs")
    with open(image, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    assert "has sha256:" in sn.verify_layer("base")


def test_layers_come_back_after_a_reboot(tmp_path: Path) -> None:
    root, work = tmp_path / "root", tmp_path / "work"
    s = ErofsSnapshotter(root)
    _commit(s, "base", "", {"a": b"1"}, work)
    _commit(s, "top", "base", {"b": b"2"}, work)
    s.close()
    for m in sorted(read_mountinfo(), key=lambda m: -len(m.mount_point)):
        if m.mount_point.startswith(str(tmp_path)):
            unmount_image(m.mount_point)  # what a reboot does
    s = ErofsSnapshotter(root)
    try:
        with temp_mount(s.prepare("c", "top"), base=work) as r:
            assert sorted(os.listdir(r)) == ["a", "b"]
        assert len(_layer_mounts(tmp_path)) == 2
    finally:
        s.close()
        for m in sorted(read_mountinfo(), key=lambda m: -len(m.mount_point)):
            if m.mount_point.startswith(str(tmp_path)):
                unmount_image(m.mount_point)


def test_crash_after_commit_leaves_upper_files_under_the_mount_point(
        sn: ErofsSnapshotter, tmp_path: Path) -> None:
    _commit(sn, "base", "", {"a": b"1"}, tmp_path / "work")
    fs = sn.image_path("base").parent / "fs"
    unmount_image(fs)
    (fs / "leftover").write_bytes(b"upper tree a crash left")
    with temp_mount(sn.view("v", "base"), base=tmp_path / "work") as r:
        assert os.listdir(r) == ["a"]
    assert is_mounted(fs)


def test_remove_unmounts_and_deletes_one_file(sn: ErofsSnapshotter, tmp_path: Path) -> None:
    _commit(sn, "base", "", {"a": b"1"}, tmp_path / "work")
    directory = sn.image_path("base").parent
    sn.view("v", "base")
    assert _layer_mounts(tmp_path)
    with pytest.raises(FailedPrecondition):
        sn.remove("base")
    sn.remove("v")
    sn.remove("base")
    assert not _layer_mounts(tmp_path)
    assert not directory.exists()


def _tar(members: list[tuple[str, bytes | None]], link: tuple[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.LNKTYPE, link[1]
            t.addfile(info)
    return buf.getvalue()


def test_streamed_layers(sn: ErofsSnapshotter, tmp_path: Path) -> None:
    assert isinstance(sn, LayerStreams)
    work = tmp_path / "work"
    diff_id = sn.prepare_stream("s1", "", io.BytesIO(_tar([("d", None), ("d/f", b"one")])))
    assert diff_id.startswith("sha256:")
    assert os.listdir(sn.image_path("s1").parent / "upper") == []
    sn.commit("l1", "s1")
    sn.prepare_stream("s2", "l1", io.BytesIO(_tar([("d", None), ("d/.wh.f", b""),
                                                    ("g", b"two")])))
    sn.commit("l2", "s2")
    with temp_mount(sn.view("v", "l2"), base=work) as r:
        assert sorted(os.listdir(r)) == ["d", "g"]
        assert os.listdir(Path(r, "d")) == []
    with pytest.raises(InvalidArgument, match="diff id mismatch"):
        sn.prepare_stream("s3", "l2", io.BytesIO(_tar([("h", b"x")])),
                          expected_diff_id="sha256:" + "0" * 64)
    with pytest.raises(NeedsLowerLayers):  # a hard link to a lower layer's file
        sn.prepare_stream("s4", "l2", io.BytesIO(_tar([], link=("k", "g"))))
    assert {i.name for i in sn.walk()} == {"l1", "l2", "v"}
    sn.cleanup()
    assert len(os.listdir(sn.image_path("l1").parent.parent)) == 3


def test_streamed_snapshot_written_through_its_mount_does_not_commit(
        sn: ErofsSnapshotter, tmp_path: Path) -> None:
    sn.prepare_stream("s", "", io.BytesIO(_tar([("f", b"1")])))
    with temp_mount(sn.mounts("s"), base=tmp_path / "work") as r:
        assert Path(r, "f").read_bytes() == b"1"
        Path(r, "g").write_bytes(b"2")
    with pytest.raises(FailedPrecondition, match="layer stream"):
        sn.commit("c", "s")


def test_user_namespace_is_one_line(tmp_path: Path) -> None:
    if not shutil.which("unshare"):
        pytest.skip("unshare missing")
    code = ("import sys\nfrom lamina.errors import LaminaError\n"
            "from lamina.snapshots.erofs import ErofsSnapshotter\n"
            "try:\n    ErofsSnapshotter(sys.argv[1])\n"
            "except LaminaError as e:\n    print(e.message)\n")
    proc = subprocess.run(["unshare", "-Urm", sys.executable, "-c", code, str(tmp_path / "r")],
                          capture_output=True, text=True, check=False)
    if "unshare failed" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    out = proc.stdout.strip()
    assert out.count("\n") == 0, out
    assert "user namespace" in out or "overlayfs cannot be mounted" in out, (out, proc.stderr)


def test_layer_written_before_its_parent_is_committed(sn: ErofsSnapshotter,
                                                      tmp_path: Path) -> None:
    """The parallel unpack: a layer's image is written while its parent is still
    being made, and settled against it (root metadata) once it is committed."""
    import threading

    parent_done = threading.Event()
    waited: list[bool] = []

    def wait() -> None:
        waited.append(parent_done.wait(timeout=30))

    result: list[str | BaseException] = []

    def child() -> None:
        try:
            result.append(sn.prepare_stream("s2", "l1", io.BytesIO(_tar([("g", b"two")])),
                                            wait=wait))
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=child)
    t.start()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(".")
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o710, 7, 8
        tf.addfile(info)
    sn.prepare_stream("s1", "", io.BytesIO(buf.getvalue()))
    sn.commit("l1", "s1")
    parent_done.set()
    t.join()
    assert waited == [True] and isinstance(result[0], str), result
    sn.commit("l2", "s2")
    with temp_mount(sn.view("v", "l2"), base=tmp_path / "work") as r:
        st = os.stat(r)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o710, 7, 8)
        assert os.listdir(r) == ["g"]


def _root_layer(mode: int, uid: int, gid: int, mtime: int, xattrs: dict[str, str]) -> bytes:
    """A layer that lists only its root, with that metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(".")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, mtime
        info.uid, info.gid = uid, gid
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("listed", [True, False], ids=["parent-lists-root", "default-root"])
def test_streamed_layer_settles_on_the_root_handed_to_it(sn: ErofsSnapshotter, tmp_path: Path,
                                                         listed: bool) -> None:
    """A layer above a layer of the same unpack takes its parent's root as the
    parent hands it (on_root -> parent_root) and is written whole before the
    parent is committed; its image is byte for byte the one settled against
    the committed parent's mount, and only its commit waits for the parent."""
    import threading

    handed: list[object] = []
    parent = (_root_layer(0o1751, 70000, 8, 1_234_567, {"user.k": "v"}) if listed
              else _tar([("base", b"0")]))
    sn.prepare_stream("s1", "", io.BytesIO(parent), on_root=handed.append)
    assert len(handed) == 1
    child = _tar([("g", b"two"), ("d", None), ("d/f", b"three")])
    parent_done = threading.Event()
    written = threading.Event()
    result: list[str | BaseException] = []

    def wait() -> None:
        assert parent_done.wait(timeout=30)

    def run() -> None:
        try:
            result.append(sn.prepare_stream("s2", "l1", io.BytesIO(child), wait=wait,
                                            parent_root=lambda: handed[0],
                                            on_root=lambda _: written.set()))
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        # the child's metadata is written while the parent is not even committed
        assert written.wait(timeout=30), result
        assert not result  # and it has not been created: that waits for the parent
    finally:
        sn.commit("l1", "s1")
        parent_done.set()
        t.join()
    assert isinstance(result[0], str), result
    sn.commit("l2", "s2")
    # the same layer settled the slow way: against the committed parent's mount
    sn.prepare_stream("s3", "l1", io.BytesIO(child))
    sn.commit("l3", "s3")
    assert sn.image_path("l2").read_bytes() == sn.image_path("l3").read_bytes()
    with temp_mount(sn.view("v", "l2"), base=tmp_path / "work") as r:
        st = os.stat(r)
        if listed:
            assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o1751, 70000, 8)
            assert st.st_mtime_ns == 1_234_567 * 10**9
            assert os.getxattr(r, "user.k") == b"v"
        assert sorted(os.listdir(r)) == (["d", "g"] if listed else ["base", "d", "g"])


def test_check_deep_verifies_layer_images(tmp_path: Path) -> None:
    """``lamina check --deep`` compares each image with the sha256 of its commit;
    garbage collection of an unreferenced layer unmounts it and deletes its file."""
    from lamina.metadata.check import check
    from lamina.metadata.gc import collect
    from lamina.metadata.root import Root
    from lamina.problems import ProblemType

    root = Root(tmp_path / "r")
    try:
        sn = root.snapshotter("erofs")
        assert isinstance(sn, ErofsSnapshotter)
        _commit(sn, "base", "", {"f": b"data"}, tmp_path / "work")
        sn.view("v", "base")
        assert not [p for p in check(root, deep=True).problems
                    if p.kind is ProblemType.LAYER_CHANGED]
        image = sn.image_path("base")
        with open(image, "r+b") as f:  # a bit flips under the mount
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        changed = [p for p in check(root, deep=True).problems
                   if p.kind is ProblemType.LAYER_CHANGED]
        assert len(changed) == 1 and "erofs/base" in changed[0].message, changed
        sn.remove("v")
        collect(root)
        assert not image.exists()
        assert not _layer_mounts(tmp_path)
    finally:
        root.close()
        for m in sorted(read_mountinfo(), key=lambda m: -len(m.mount_point)):
            if m.mount_point.startswith(str(tmp_path)):
                unmount_image(m.mount_point)


def test_writer_space_guard_keeps_its_directory(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The space checks during a write look at the image's directory: the writer
    closed that descriptor after the first check, so later checks read whatever
    reused the number (EBADF in a parallel unpack)."""
    from lamina.archive import limits
    from lamina.erofs.writer import write_image

    seen: list[str] = []
    short = limits.SpaceGuard._short

    def checked(self: limits.SpaceGuard) -> str | None:
        seen.append(os.readlink(f"/proc/self/fd/{self._fd}"))
        return short(self)

    monkeypatch.setattr(limits.SpaceGuard, "_short", checked)
    big = os.urandom(1 << 20) * 40  # past one check interval (16 MiB)
    (tmp_path / "d").mkdir()
    write_image(io.BytesIO(_tar([("big", big)])), tmp_path / "d" / "x.erofs")
    assert len(seen) >= 2 and set(seen) == {str(tmp_path / "d")}, seen


def test_streamed_layer_takes_unlisted_parents_from_its_lowers(sn: ErofsSnapshotter,
                                                               tmp_path: Path) -> None:
    """A layer adding usr/x without listing usr is written from its stream too (no
    mounted fallback): usr keeps the lower's owner, mode and xattrs, as overlayfs's
    copy-up keeps them; a whiteout in a directory the lowers lack makes nothing."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("usr")
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o750, 5, 6
        info.pax_headers = {"SCHILY.xattr.user.k": "v"}
        tf.addfile(info)
        info = tarfile.TarInfo("usr/old")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"o"))
    sn.prepare_stream("s1", "", io.BytesIO(buf.getvalue()))
    sn.commit("l1", "s1")
    sn.prepare_stream("s2", "l1", io.BytesIO(_tar([("usr/x", b"x"), ("nodir/.wh.y", b"")])))
    sn.commit("l2", "s2")
    with temp_mount(sn.view("v", "l2"), base=tmp_path / "work") as r:
        st = os.stat(Path(r, "usr"))
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 5, 6)
        assert os.getxattr(Path(r, "usr"), "user.k") == b"v"
        assert sorted(os.listdir(Path(r, "usr"))) == ["old", "x"]
        assert sorted(os.listdir(r)) == ["usr"]


def test_idmapped_overlay_of_layer_mounts(sn: ErofsSnapshotter, tmp_path: Path) -> None:
    """A container with a user namespace of its own (``run --userns``): the ID-mapped
    clone of the lowers' common directory takes the layer mounts below it along
    (it was a clone of that directory alone: an empty root)."""
    from lamina.mounts.idmap import parse_userns, with_idmap

    _commit(sn, "base", "", {"etc/f": b"1"}, tmp_path / "work")
    _commit(sn, "top", "base", {"etc/g": b"2"}, tmp_path / "work")
    mounts = with_idmap(sn.prepare("c", "top"), parse_userns("100000:65536"))
    with temp_mount(mounts, base=tmp_path / "work") as r:
        assert Path(r, "etc/f").read_bytes() == b"1"
        assert Path(r, "etc/g").read_bytes() == b"2"
        assert os.stat(Path(r, "etc/f")).st_uid == 100000


def test_missing_layer_image_is_one_line(sn: ErofsSnapshotter, tmp_path: Path) -> None:
    from lamina.errors import NotFound

    _commit(sn, "base", "", {"a": b"1"}, tmp_path / "work")
    sn.image_path("base").unlink()
    with pytest.raises(NotFound, match=r"layer image .* is missing"):
        sn.view("v", "base")
    assert any("layer image" in p.message for p in sn.check())


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def test_check_deep_sees_a_changed_byte_in_block_0_and_in_the_data(
        sn: ErofsSnapshotter) -> None:
    """The digest is hashed while the image is written, block 0 (the superblock's)
    last: a byte changed there, or in a file's data, is caught all the same."""
    sn.prepare_stream("s", "", io.BytesIO(_tar([("big", b"x" * 10_000)])))
    sn.commit("base", "s")
    image = sn.image_path("base")
    assert (image.parent / "layer.sha256").read_text().endswith(" block0-last\n")
    assert sn.verify_layer("base") == ""
    for offset in (0, 1024 + 8, 4096 + 100):  # block 0, the superblock, the data
        _flip(image, offset)
        assert "has sha256:" in sn.verify_layer("base"), offset
        _flip(image, offset)
        assert sn.verify_layer("base") == ""


def test_check_deep_verifies_records_of_the_file_sha256(sn: ErofsSnapshotter,
                                                        tmp_path: Path) -> None:
    """A root written before the block0-last digest recorded the image file's sha256:
    it is verified as that."""
    _commit(sn, "base", "", {"f": b"data"}, tmp_path / "work")
    image = sn.image_path("base")
    unmount_image(image.parent / "fs")
    plain = "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()
    (image.parent / "layer.sha256").write_text(plain + "\n")
    assert sn.verify_layer("base") == ""
    _flip(image, 1024 + 8)
    assert f"recorded {plain}" in sn.verify_layer("base")
    (image.parent / "layer.sha256").write_text("md5:0123\n")
    assert "unknown image digest record 'md5:0123'" in sn.verify_layer("base")
