"""A collection deletes the removed snapshots' directories while it deletes the
blobs, not after: their rows are gone and the directories out of the id space
before the blobs' transaction starts, so the layers' unlinks (for erofs,
freeing an image's page cache) overlap the blobs' unlinks and syncs (issue 18:
``image rm`` + GC)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from lamina.content import write_blob
from lamina.content.local import LocalContentStore
from lamina.errors import Internal
from lamina.metadata import gc
from lamina.metadata.gc import collect
from lamina.metadata.root import Root
from lamina.mounts.mount import temp_mount
from lamina.mounts.mountinfo import read_mountinfo
from lamina.snapshots.directory import DirectorySnapshotter


@pytest.fixture
def root(open_root: Root) -> Root:
    return open_root


def _garbage(root: Root) -> Path:
    """A committed snapshot and a blob nothing keeps; the snapshots' directory."""
    sn = root.snapshotter("native")
    sn.prepare("a", "")
    sn.commit("A", "a")
    write_blob(root.content(), "x", b"x")
    return root.snapshots_dir("native") / "snapshots"


def test_removed_directories_go_while_the_blobs_are_deleted(
        root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = _garbage(root)
    seen: list[list[str]] = []
    real = LocalContentStore.delete_many

    def delete_many(self: LocalContentStore, digests: Sequence[str]) -> None:
        deadline = time.monotonic() + 5
        while os.listdir(dirs) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(os.listdir(dirs))  # gone meanwhile, by the other thread
        real(self, digests)

    monkeypatch.setattr(LocalContentStore, "delete_many", delete_many)
    report = collect(root)

    assert seen == [[]]
    assert [k for _, k, _ in report.snapshots] == ["A"] and len(report.content) == 1
    assert os.listdir(dirs) == []


def test_a_failed_deletion_is_raised_by_the_collection(
        root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = _garbage(root)
    sn = root.snapshotter("native")

    def broken(self: object, path: Path) -> None:
        raise Internal(f"cannot delete {path}")

    monkeypatch.setattr(type(sn), "_delete", broken)
    with pytest.raises(Internal, match="cannot delete"):
        collect(root)
    monkeypatch.undo()
    collect(root)  # the next one finishes it
    assert os.listdir(dirs) == []
    assert not list(sn.walk()) and not list(root.content().walk())


def test_a_dry_run_starts_no_deletion(root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = _garbage(root)
    monkeypatch.setattr(gc, "threading", SimpleNamespace(Thread=None))  # fails if used
    report = collect(root, dry_run=True)
    assert [k for _, k, _ in report.snapshots] == ["A"]
    assert len(os.listdir(dirs)) == 1


@pytest.mark.parametrize("shared", [True, False])
def test_threads_share_the_deletion_and_each_returns_with_all_gone(
        root: Root, monkeypatch: pytest.MonkeyPatch, shared: bool) -> None:
    """With SHARED_REAP (erofs: kernel work) threads split a pass; without it (a
    tree walked in Python) one thread deletes while the other waits."""
    sn = root.snapshotter("native")
    assert isinstance(sn, DirectorySnapshotter)
    monkeypatch.setattr(type(sn), "SHARED_REAP", shared)
    dirs = root.snapshots_dir("native") / "snapshots"
    for key in ("a", "b"):
        sn.prepare(key, "")
    by: dict[str, str] = {}
    real = type(sn)._delete

    def slow(self: DirectorySnapshotter, path: Path) -> None:
        by[path.name] = threading.current_thread().name
        time.sleep(0.3)  # the other thread takes the next directory meanwhile
        real(sn, path)

    monkeypatch.setattr(type(sn), "_delete", slow)
    left: dict[str, list[str]] = {}

    def flush() -> None:
        sn.flush()
        left[threading.current_thread().name] = os.listdir(dirs)

    with sn.deferred_removal():
        sn.remove("a")
        sn.remove("b")
        workers = [threading.Thread(target=flush, name=n) for n in ("one", "two")]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert sorted(by) == ["rm-1", "rm-2"]
    assert len(set(by.values())) == (2 if shared else 1)
    assert left == {"one": [], "two": []}


@pytest.mark.skipif(os.geteuid() != 0, reason="EROFS mounts need root")
def test_an_erofs_layer_is_unmounted_where_its_directory_is_deleted(
        root: Root, tmp_root: Path) -> None:
    sn = root.snapshotter("erofs")
    assert isinstance(sn, DirectorySnapshotter)
    with temp_mount(sn.prepare("a", ""), base=tmp_root / "work") as tree:
        Path(tree, "f").write_text("f")
    sn.commit("A", "a")
    sn.view("v", "A")  # its mounts: the layer is mounted on demand
    sn.remove("v")
    dirs = root.snapshots_dir("erofs") / "snapshots"

    def layers() -> list[str]:
        return [m.mount_point for m in read_mountinfo()
                if m.fstype == "erofs" and m.mount_point.startswith(f"{dirs}/")]

    assert len(layers()) == 1
    with sn.deferred_removal():
        sn.remove("A")
        # the rename out of the id space moved the mount: no unmount on the way
        assert [os.path.relpath(p, dirs) for p in layers()] == ["rm-1/fs"]
    assert layers() == [] and os.listdir(dirs) == []
