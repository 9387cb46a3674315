"""Cases about the mounted trees: layering, whiteouts, ownership, read-only views, depth."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

from lamina.errors import FailedPrecondition
from lamina.snapshots import Capability, Kind, Snapshotter
from lamina.snapshots.testsuite.fstest import (
    Applier,
    Chmod,
    Chown,
    CreateDir,
    CreateFile,
    Link,
    Mkfifo,
    Mknod,
    Remove,
    Rename,
    Symlink,
    apply,
    reference_dir,
)
from lamina.snapshots.testsuite.harness import (
    LABELS,
    case,
    check_snapshots,
    check_view,
    commit_empty,
    create_snapshot,
    mounted,
    require,
    same_tree,
    unique,
)


def _sleep_to_next_second() -> None:
    now = time.time()
    time.sleep(int(now) + 1 - now)


@case("LayerFileUpdate")
def layer_file_update(sn: Snapshotter, work: Path) -> None:
    """A file rewritten in the next layer, with the same and with a different size,
    within one second and across second boundaries (docker#21555)."""
    l1 = apply(
        CreateDir("/etc", 0o700),
        CreateFile("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
        CreateFile("/etc/profile", b"PATH=/usr/bin", 0o644),
        CreateFile("/etc/motd", b"short", 0o644),
    )
    l2 = apply(
        CreateFile("/etc/hosts", b"mydomain 10.0.0.2", 0o644),  # same size, same second
        CreateFile("/etc/profile", b"PATH=/usr/bin", 0o666),  # mode only
        CreateFile("/etc/motd", b"a much longer message of the day\n", 0o644),
        CreateDir("/root", 0o700),
        CreateFile("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
    )
    l3 = apply(CreateFile("/etc/motd", b"", 0o644), CreateFile("/etc/hosts", b"x", 0o600))
    for i in range(5):
        if i:
            _sleep_to_next_second()
        check_snapshots(sn, work, l1, l2, l3)


@case("RemoveDirectoryInLowerLayer")
def remove_directory_in_lower_layer(sn: Snapshotter, work: Path) -> None:
    """A directory removed and recreated hides the old content in later layers (docker#25244)."""
    l1 = apply(CreateDir("/lib", 0o700), CreateFile("/lib/hidden", b"", 0o644))
    l2 = apply(
        Remove("/lib"), CreateDir("/lib", 0o700), CreateFile("/lib/not-hidden", b"", 0o644)
    )
    l3 = apply(CreateFile("/lib/newfile", b"", 0o644))
    check_snapshots(sn, work, l1, l2, l3)


@case("Chown")
def chown(sn: Snapshotter, work: Path) -> None:
    """Owners changed on lower directories and files stick (docker#20240, #24913, #28391)."""
    l1 = apply(
        CreateDir("/opt", 0o700),
        CreateDir("/opt/a", 0o700),
        CreateDir("/opt/a/b", 0o700),
        CreateFile("/opt/a/b/file.txt", b"hello", 0o644),
        Symlink("a/b/file.txt", "/opt/link"),
    )
    l2 = apply(
        Chown("/opt", 1, 1),
        Chown("/opt/a", 1, 1),
        Chown("/opt/a/b", 1, 1),
        Chown("/opt/a/b/file.txt", 1, 1),
        Chown("/opt/link", 2, 3),
    )
    check_snapshots(sn, work, l1, l2)


@case("DirectoryPermissionOnCommit")
def directory_permission_on_commit(sn: Snapshotter, work: Path) -> None:
    """Owners of directories survive commit, removal and recreation (docker#27298)."""
    l1 = apply(
        CreateDir("/dir1", 0o700),
        CreateDir("/dir2", 0o700),
        CreateDir("/dir3", 0o700),
        CreateDir("/dir4", 0o700),
        CreateFile("/dir4/f1", b"...", 0o644),
        CreateDir("/dir5", 0o700),
        CreateFile("/dir5/f1", b"...", 0o644),
        Chown("/dir1", 1, 1),
        Chown("/dir2", 1, 1),
        Chown("/dir3", 1, 1),
        Chown("/dir5", 1, 1),
        Chown("/dir5/f1", 1, 1),
    )
    l2 = apply(
        Chown("/dir2", 0, 0),
        Remove("/dir3"),
        Chown("/dir4", 1, 1),
        Chown("/dir4/f1", 1, 1),
    )
    l3 = apply(
        CreateDir("/dir3", 0o700),
        Chown("/dir3", 1, 1),
        Remove("/dir5"),
        CreateDir("/dir5", 0o700),
        Chown("/dir5", 1, 1),
    )
    check_snapshots(sn, work, l1, l2, l3)


@case("DeletedFilesInChildSnapshot")
def deleted_files_in_child(sn: Snapshotter, work: Path) -> None:
    """Files deleted in a layer stay deleted in the layers above it."""
    l1 = apply(CreateFile("/foo", b"foo\n", 0o777), CreateFile("/foobar", b"foobar\n", 0o777))
    l2 = apply(Remove("/foobar"))
    l3 = apply()
    check_snapshots(sn, work, l1, l2, l3)


@case("MoveFileFromLowerLayer")
def move_file_from_lower_layer(sn: Snapshotter, work: Path) -> None:
    """Files moved (by hard link + delete) from lower layers land at the new place only."""
    l1 = apply(
        CreateDir("/dir1", 0o700),
        CreateFile("/dir1/f1", b"Hello", 0o644),
        CreateDir("dir2", 0o700),
        CreateFile("dir2/f2", b"...", 0o644),
    )
    l2 = apply(
        CreateDir("/dir3", 0o700),
        CreateFile("/dir3/f1", b"Hello", 0o644),
        Remove("/dir1"),
        Link("dir2/f2", "dir3/f2"),
        Remove("dir2/f2"),
    )
    check_snapshots(sn, work, l1, l2)


@case("Rename")
def rename(sn: Snapshotter, work: Path) -> None:
    """Renames of lower directories and files, and a rename over a lower file (docker#25409)."""
    l1 = apply(
        CreateDir("/dir1", 0o700),
        CreateFile("/dir1/inside", b"inside dir1", 0o640),
        CreateDir("/somefiles", 0o700),
        CreateFile("/somefiles/f1", b"was here first!", 0o644),
        CreateFile("/somefiles/f2", b"nothing interesting", 0o644),
    )
    l2 = apply(
        Rename("/dir1", "/dir2"),
        CreateFile("/somefiles/f1-overwrite", b"new content 1", 0o644),
        Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
        Rename("/somefiles/f2", "/somefiles/f3"),
    )
    l3 = apply(Rename("/dir2", "/dir1"), CreateFile("/dir1/new", b"new", 0o644))
    check_snapshots(sn, work, l1, l2, l3)


@case("Hardlinks")
def hardlinks(sn: Snapshotter, work: Path) -> None:
    """Hard links made in a layer, and to files of lower layers, stay links."""
    l1 = apply(
        CreateDir("/d", 0o755),
        CreateFile("/d/a", b"shared content\n", 0o644),
        Link("/d/a", "/d/b"),
        Link("/d/a", "/top"),
        CreateFile("/other", b"other\n", 0o600),
    )
    l2 = apply(
        Link("/other", "/d/other-link"),
        CreateFile("/d/new", b"new\n", 0o644),
        Link("/d/new", "/new-link"),
    )
    l3 = apply(Remove("/d/b"))
    check_snapshots(sn, work, l1, l2, l3)


@case("HardlinkChangedInUpperLayer")
def hardlink_changed_in_upper_layer(sn: Snapshotter, work: Path) -> None:
    """Writing or chmod-ing one name of a lower layer's hard-link set: with
    LINKED_COPY_UP every name changes; without it (overlayfs) exactly the changed
    name does and the set splits — the capability must tell the truth either way."""
    l1 = apply(
        CreateFile("/a", b"same", 0o644),
        Link("/a", "/b"),
        CreateFile("/c", b"other", 0o644),
        Link("/c", "/d"),
    )
    l2 = apply(CreateFile("/a", b"changed through a", 0o644), Chmod("/d", 0o600))
    if Capability.LINKED_COPY_UP in sn.capabilities:
        check_snapshots(sn, work, l1, l2)
        return
    top = create_snapshot(sn, create_snapshot(sn, "", work, l1), work, l2)
    key = f"{top}-split-view"
    try:
        with mounted(sn.view(key, top), work) as root:
            assert (root / "a").read_bytes() == b"changed through a"
            assert (root / "b").read_bytes() == b"same", "link set did not split"
            assert stat.S_IMODE((root / "d").stat().st_mode) == 0o600
            assert stat.S_IMODE((root / "c").stat().st_mode) == 0o644, "link set did not split"
            assert (root / "a").stat().st_ino != (root / "b").stat().st_ino
    finally:
        sn.remove(key)


@case("RootAttributesInherited")
def root_attributes_inherited(sn: Snapshotter, work: Path) -> None:
    """A layer that changes the root directory's mode and owner passes them on to children."""
    l1 = apply(Chmod("/", 0o750), Chown("/", 1, 2), CreateFile("/f", b"x", 0o644))
    l2 = apply(CreateFile("/g", b"y", 0o644))
    l3 = apply(Chmod("/", 0o711))
    check_snapshots(sn, work, l1, l2, l3)


@case("FileTypes")
def file_types(sn: Snapshotter, work: Path) -> None:
    """Every file type and odd mode bits survive layering, and replacing one type by another."""
    l1 = apply(
        CreateFile("/empty", b"", 0o644),
        CreateFile("/setuid", b"#!/bin/sh\n", 0o4755),
        CreateFile("/setgid", b"#!/bin/sh\n", 0o2711),
        CreateDir("/sticky", 0o1777),
        CreateDir("/noperm", 0o000),
        Symlink("/does/not/exist", "/dangling"),
        Symlink("empty", "/relative"),
        Mkfifo("/fifo", 0o640),
        Mknod("/null", 1, 3, 0o666),
        CreateFile("/" + "n" * 255, b"long name\n", 0o644),
        CreateFile("/ünï cödé name", b"unicode\n", 0o644),
        CreateFile("/big", os.urandom(3 << 20), 0o644),
        CreateDir("/becomes-file", 0o755),
        CreateFile("/becomes-file/child", b"child\n", 0o644),
        CreateFile("/becomes-dir", b"file\n", 0o644),
        CreateFile("/becomes-symlink", b"file\n", 0o644),
        Symlink("empty", "/symlink-becomes-file"),
    )
    l2 = apply(
        Remove("/becomes-file"),
        CreateFile("/becomes-file", b"now a file\n", 0o600),
        Remove("/becomes-dir"),
        CreateDir("/becomes-dir", 0o750),
        CreateFile("/becomes-dir/child", b"child\n", 0o644),
        Remove("/becomes-symlink"),
        Symlink("setuid", "/becomes-symlink"),
        Remove("/symlink-becomes-file"),
        CreateFile("/symlink-becomes-file", b"file\n", 0o644),
        Chmod("/setuid", 0o755),
        Chmod("/sticky", 0o755),
        Remove("/fifo"),
        Mkfifo("/fifo", 0o600),
    )
    l3 = apply(
        Remove("/becomes-dir"),  # a directory made in the layer below, gone again
        CreateFile("/becomes-dir", b"a file once more\n", 0o644),
        Chmod("/noperm", 0o755),
    )
    check_snapshots(sn, work, l1, l2, l3)


@case("ViewReadonly")
def view_readonly(sn: Snapshotter, work: Path) -> None:
    """Writing into a mounted view fails with EROFS, for views of zero, one and two layers."""
    commit_empty(sn, "committed", key="preparing")
    commit_empty(sn, "committed-2", "committed", key="preparing-2")
    for view, parent in (("view-0", ""), ("view-1", "committed"), ("view-2", "committed-2")):
        with mounted(sn.view(view, parent, labels=LABELS), work) as root:
            for attempt in (
                lambda: (root / "testfile").write_bytes(b"testcontent"),
                lambda: (root / "testdir").mkdir(),
                lambda: os.chmod(root, 0o700),
            ):
                try:
                    attempt()
                except OSError as exc:
                    if exc.errno != errno.EROFS:
                        raise AssertionError(
                            f"{view}: write failed with {exc!r}, want EROFS"
                        ) from exc
                else:
                    raise AssertionError(f"{view}: writing into a view succeeded")
        sn.remove(view)
    sn.remove("committed-2")
    sn.remove("committed")


@case("ViewOfCommitted")
def view_of_committed(sn: Snapshotter, work: Path) -> None:
    """Views show their parent exactly, stay isolated from writable children, mount twice."""
    l1 = apply(CreateDir("/d", 0o755), CreateFile("/d/one", b"1\n", 0o644))
    l2 = apply(CreateFile("/d/two", b"2\n", 0o644), Remove("/d/one"))
    flat = reference_dir(work)
    c1 = create_snapshot(sn, "", work, l1, flat=flat)
    flat1 = reference_dir(work, l1)
    c2 = create_snapshot(sn, c1, work, l2, flat=flat)
    flat2 = reference_dir(work, l1, l2)
    empty = reference_dir(work)

    sn.view("v-empty", "", labels=LABELS)
    check_view_key(sn, work, "v-empty", empty)
    sn.view("v1", c1)
    sn.view("v2", c2)
    check_view_key(sn, work, "v1", flat1)
    check_view_key(sn, work, "v2", flat2)
    check_view(sn, work, c1, flat1)
    check_view(sn, work, c2, flat2)

    # A writable child changes nothing its parent's views show, even mounted at once.
    with (
        mounted(sn.mounts("v2"), work) as v_root,
        mounted(sn.mounts("v2"), work) as v_root_again,
        mounted(sn.prepare("child", c2), work) as a_root,
    ):
        (a_root / "d" / "two").write_bytes(b"changed\n")
        (a_root / "d" / "three").write_bytes(b"3\n")
        os.chmod(a_root / "d", 0o700)
        same_tree(sn, v_root, flat2)
        same_tree(sn, v_root_again, flat2)
    check_view_key(sn, work, "v2", flat2)
    check_view_key(sn, work, "v1", flat1)


def check_view_key(sn: Snapshotter, work: Path, key: str, expected: Path) -> None:
    info = sn.stat(key)
    assert info.kind is Kind.VIEW, info
    with mounted(sn.mounts(key), work) as root:
        same_tree(sn, root, expected)


@case("RootPermission")
def root_permission(sn: Snapshotter, work: Path) -> None:
    """The root of every mounted snapshot is a 0755 directory."""
    with mounted(sn.prepare("preparing", "", labels=LABELS), work) as root:
        mode = stat.S_IMODE(os.stat(root).st_mode)
        assert mode == 0o755, f"active root mode {mode:o}, want 755"
        (root / "f").write_bytes(b"x")
    sn.commit("c", "preparing")
    for key, make in (("child", sn.prepare), ("view", sn.view)):
        with mounted(make(key, "c"), work) as root:
            mode = stat.S_IMODE(os.stat(root).st_mode)
            assert mode == 0o755, f"{key} root mode {mode:o}, want 755"


@case("Usage")
def usage(sn: Snapshotter, work: Path) -> None:
    """Usage counts the snapshot's own inodes and bytes, hard links once."""
    key = "usage-active"
    mounts = sn.prepare(key, "", labels=LABELS)
    u0 = sn.usage(key)
    assert u0.inodes >= 0 and u0.size >= 0, u0
    big = 1 << 20
    with mounted(mounts, work) as root:
        (root / "dir").mkdir()
        (root / "big").write_bytes(b"b" * big)
        os.link(root / "big", root / "dir" / "link1")
        os.link(root / "big", root / "link2")
        (root / "small").write_bytes(b"s" * 100)
        os.symlink("small", root / "sym")
    u1 = sn.usage(key)
    # new inodes: dir, big (3 names), small, sym
    assert u1.inodes - u0.inodes == 4, (u0, u1)
    grown = u1.size - u0.size
    assert big + 100 <= grown < big + (256 << 10), f"size grew by {grown} ({u0} -> {u1})"

    sn.commit("usage-committed", key)
    uc = sn.usage("usage-committed")
    assert uc == u1, (uc, u1)

    child = "usage-child"
    with mounted(sn.prepare(child, "usage-committed"), work) as root:
        (root / "another").write_bytes(b"a" * 10)
    uchild = sn.usage(child)
    if Capability.OVERLAY in sn.capabilities:
        # Only the child's own layer counts: the parent's big file is not in it.
        assert uchild.size < big, uchild
        assert uchild.inodes <= u0.inodes + 1, (u0, uchild)
    else:
        assert uchild.inodes >= u1.inodes, (u1, uchild)
    sn.view("usage-view", "usage-committed")
    sn.usage("usage-view")  # defined for every kind
    sn.remove("usage-view")
    sn.remove(child)
    sn.remove("usage-committed")


@case("CleanupKeepsLive")
def cleanup_keeps_live(sn: Snapshotter, work: Path) -> None:
    """cleanup() removes nothing the metadata knows, whatever its kind."""
    flat = reference_dir(work)
    l1 = apply(CreateFile("/f", b"one\n", 0o644))
    c1 = create_snapshot(sn, "", work, l1, flat=flat)
    sn.prepare("gone", c1)
    sn.remove("gone")
    with mounted(sn.prepare("active", c1), work) as root:
        (root / "g").write_bytes(b"two\n")
    sn.view("view", c1)
    sn.cleanup()
    sn.cleanup()
    check_view(sn, work, c1, flat)
    with mounted(sn.mounts("active"), work) as root:
        assert (root / "g").read_bytes() == b"two\n"
        assert (root / "f").read_bytes() == b"one\n"
    with mounted(sn.mounts("view"), work) as root:
        same_tree(sn, root, flat)
    sn.commit("c2", "active")
    try:
        sn.mounts("c2")
    except FailedPrecondition:
        pass
    else:
        raise AssertionError("mounts of a committed snapshot succeeded")


def _deep(sn: Snapshotter, work: Path, layers: int, check_every: int) -> None:
    lowest = apply(
        CreateFile("/bottom", b"way at the bottom\n", 0o777),
        CreateFile("/overwriteme", b"FIRST!\n", 0o777),
        CreateDir("/ADDHERE", 0o755),
        CreateDir("/ONLYME", 0o755),
        CreateFile("/ONLYME/bottom", b"bye!\n", 0o777),
    )
    appliers: list[Applier] = [lowest]
    for i in range(1, layers):
        appliers.append(
            apply(
                CreateFile("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
                CreateFile(f"/ADDHERE/file-{i}", b"same\n", 0o755),
                Remove("/ONLYME"),
                CreateDir("/ONLYME", 0o755),
                CreateFile(f"/ONLYME/file-{i}", b"only me!\n", 0o777),
            )
        )
    flat = reference_dir(work)
    parent = ""
    for i, a in enumerate(appliers):
        key = unique(f"prepare-layer-{i}")
        check = i % check_every == 0 or i == layers - 1
        with mounted(sn.prepare(key, parent, labels=LABELS), work) as root:
            if check:
                same_tree(sn, root, flat)
            a(flat)
            a(root)
            if check:
                same_tree(sn, root, flat)
        parent = unique(f"committed-{i}")
        sn.commit(parent, key, labels=LABELS)
    with mounted(sn.view("fullview", parent, labels=LABELS), work) as root:
        same_tree(sn, root, flat)


@case("128LayersMount")
def layers_128(sn: Snapshotter, work: Path) -> None:
    """A chain of 128 layers mounts and shows the right tree at every step."""
    _deep(sn, work, 128, 1)


@case("500LayersMount")
def layers_500(sn: Snapshotter, work: Path) -> None:
    """500 layers (overlayfs's maximum stack) when the snapshotter supports deep chains."""
    require(sn, Capability.DEEP_CHAINS)
    _deep(sn, work, 500, 25)
