"""Garbage collection removes an image's snapshots in one metadata transaction
(:class:`lamina.snapshots.BatchRemoval`) and its blobs in one more, with one
sync of the blobs directory (:class:`lamina.content.BatchDelete`), and the erofs
snapshotter deletes a removed layer's directory by name, with no tree walk
(issue 18: ``image rm`` + GC on erofs costs a fraction of overlay's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.content import BatchDelete, write_blob
from lamina.metadata.gc import collect
from lamina.metadata.root import Root
from lamina.mounts.mount import temp_mount
from lamina.mounts.mountinfo import read_mountinfo
from lamina.owners import CLI, CONTAINERD
from lamina.snapshots import BatchRemoval, Snapshotter
from lamina.snapshots.storage import MetaStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="overlay and EROFS mounts need root")


def _layer_mounts(base: Path) -> list[str]:
    return [m.mount_point for m in read_mountinfo()
            if m.fstype == "erofs" and m.mount_point.startswith(f"{base}/")]


@pytest.fixture
def root(open_root: Root) -> Root:
    return open_root


def _chain(sn: Snapshotter, names: list[str], work: Path) -> None:
    """Committed snapshots ``names``, each on the one before (a file each)."""
    parent = ""
    for name in names:
        with temp_mount(sn.prepare(f"{name}-active", parent), base=work) as tree:
            Path(tree, name).write_text(name)
        sn.commit(name, f"{name}-active")
        parent = name


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    write = MetaStore.write

    def counted(self: MetaStore, *args: object, **kwargs: object) -> object:
        calls[0] += 1
        return write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(MetaStore, "write", counted)
    return calls


@pytest.mark.parametrize("name", ["overlay", "erofs"])
def test_gc_removes_a_layer_chain_in_one_transaction(
        root: Root, name: str, tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sn = root.snapshotter(name)
    _chain(sn, ["l1", "l2", "l3", "l4"], tmp_root / "work")
    dirs = root.snapshots_dir(name) / "snapshots"
    assert len(os.listdir(dirs)) == 4
    writes = _count_writes(monkeypatch)

    report = collect(root)

    assert [k for _, k, _ in report.snapshots] == ["l4", "l3", "l2", "l1"]
    assert writes[0] == 1  # one transaction for the four (one each before)
    assert not list(sn.walk())
    assert os.listdir(dirs) == []  # the directories went before collect returned
    assert not _layer_mounts(tmp_root)


@pytest.mark.parametrize("name", ["overlay", "erofs"])
def test_remove_many_keeps_what_has_children_and_passes_over_what_is_gone(
        root: Root, name: str, tmp_root: Path) -> None:
    sn = root.snapshotter(name)
    assert isinstance(sn, BatchRemoval)
    _chain(sn, ["base", "mid", "top"], tmp_root / "work")
    sn.view("child-of-mid", "mid")  # not in the batch: it keeps mid, and base under it

    kept = sn.remove_many(["top", "gone", "mid", "base"])

    assert kept == {"mid", "base"}
    assert {i.name for i in sn.walk()} == {"base", "mid", "child-of-mid"}
    sn.remove("child-of-mid")
    assert sn.remove_many(["mid", "base"]) == set()
    assert not list(sn.walk())
    assert os.listdir(root.snapshots_dir(name) / "snapshots") == []
    assert not _layer_mounts(tmp_root)


def test_erofs_deletes_a_removed_layer_without_a_tree_walk(
        root: Root, tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sn = root.snapshotter("erofs")
    _chain(sn, ["base", "top"], tmp_root / "work")
    sn.view("v", "top")  # an overlay of the layer mounts: removed after it, they unmount
    sn.remove("v")

    def walked(path: object) -> None:
        raise AssertionError(f"tree walk of {path}")

    import lamina.snapshots.directory as directory

    monkeypatch.setattr(directory, "remove_tree", walked)
    collect(root)

    assert not list(sn.walk())
    assert os.listdir(root.snapshots_dir("erofs") / "snapshots") == []
    assert not _layer_mounts(tmp_root)


def _count_blob_dir_syncs(monkeypatch: pytest.MonkeyPatch, blobs: Path) -> list[int]:
    import lamina.content.local as local

    calls = [0]
    sync = local.fsync_dir

    def counted(path: str | os.PathLike[str]) -> None:
        calls[0] += Path(path) == blobs
        sync(path)

    monkeypatch.setattr(local, "fsync_dir", counted)
    return calls


def test_delete_many_drops_the_owners_references_with_one_sync(
        root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    store = root.content()
    assert isinstance(store, BatchDelete)
    a, b, c, shared = (write_blob(store, n, n.encode()) for n in ("a", "b", "c", "shared"))
    write_blob(store.scoped(CONTAINERD), "shared", b"shared")  # containerd holds it too
    cli = store.scoped(CLI)
    syncs = _count_blob_dir_syncs(monkeypatch, root.content_dir / "blobs" / "sha256")

    cli.delete_many([a, b, shared, "sha256:" + "0" * 64])

    assert syncs[0] == 1
    assert {i.digest for i in cli.walk()} == {c}
    assert {i.digest for i in store.scoped(CONTAINERD).walk()} == {shared}
    assert store.blob_path(shared).exists() and store.blob_path(c).exists()
    assert not store.blob_path(a).exists() and not store.blob_path(b).exists()


def test_gc_deletes_the_blobs_with_one_directory_sync(
        root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    store = root.content()
    digests = [write_blob(store, n, n.encode()) for n in ("a", "b", "c")]
    syncs = _count_blob_dir_syncs(monkeypatch, root.content_dir / "blobs" / "sha256")

    report = collect(root)

    assert sorted(d for d, _ in report.content) == sorted(digests)
    assert syncs[0] == 1  # one each before
    assert not list(store.walk())
