"""How deep a snapshot may stack, and a parent chain that loops.

overlayfs mounts at most 500 lower layers (the kernel's OVL_MAX_STACK); beyond
that the mount fails with a bare EINVAL ("fsconfig lowerdir+=…: Invalid
argument") long after the layers were written. The overlay and erofs
snapshotters refuse a snapshot on a deeper parent up front, and an unpack
refuses an image with more layers before writing any; native copies its parent
and has no limit. A parent chain edited into a loop ends the walk with an error
instead of running forever.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user

from lamina.errors import Internal, LaminaError, ResourceExhausted
from lamina.images.service import ImageService
from lamina.metadata.root import Root
from lamina.mounts.mount import temp_mount
from lamina.oci.identity import chain_ids
from lamina.snapshots.directory import DirectorySnapshotter
from lamina.snapshots.erofs import ErofsSnapshotter
from lamina.snapshots.native import NativeSnapshotter
from lamina.snapshots.overlay import OverlaySnapshotter

LIMITED: list[type[DirectorySnapshotter]] = [OverlaySnapshotter, ErofsSnapshotter]


@contextmanager
def opened(cls: type[DirectorySnapshotter], path: Path) -> Iterator[DirectorySnapshotter]:
    sn = cls(path)
    try:
        yield sn
    finally:
        sn.close()


def _chain(sn: DirectorySnapshotter, depth: int) -> str:
    """``depth`` committed snapshots, each on the one before, the first holding the
    file ``bottom``; the top one's name."""
    parent = ""
    for i in range(depth):
        sn.prepare(f"a{i}", parent)
        if not parent:
            (sn.layer_dir("a0") / "bottom").write_text("layer 0")
        sn.commit(f"c{i}", f"a{i}")
        parent = f"c{i}"
    return parent


def _dirs(sn: DirectorySnapshotter) -> list[str]:
    return sorted(p.name for p in (sn.root / "snapshots").iterdir())


def _assert_top_sees_the_bottom(sn: DirectorySnapshotter, parent: str) -> None:
    """Prepare ``top`` on ``parent``; its mount shows the first layer's file."""
    with temp_mount(sn.prepare("top", parent)) as where:
        assert (Path(where) / "bottom").read_text() == "layer 0"


@pytest.mark.parametrize("cls", LIMITED, ids=lambda c: c.__name__)
def test_a_snapshot_deeper_than_the_limit_is_refused_before_any_work(
        cls: type[DirectorySnapshotter], tmp_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    require_root_user()
    monkeypatch.setattr(cls, "MAX_DEPTH", 3)
    with opened(cls, tmp_root / "sn") as sn:
        top = _chain(sn, 4)  # the last one prepared on 3 ancestors: the limit
        sn.prepare("fits", "c2")
        before = _dirs(sn)
        for make in (sn.prepare, sn.view):
            with pytest.raises(ResourceExhausted) as err:
                make("too-deep", top)
            assert str(err.value) == (
                "parent snapshot 'c3' is 4 layers deep: a snapshot on it would stack "
                "more than 3 layers, this snapshotter's limit")
        assert _dirs(sn) == before
        assert sorted(i.name for i in sn.walk()) == ["c0", "c1", "c2", "c3", "fits"]


def test_native_copies_its_parent_and_has_no_limit(tmp_root: Path) -> None:
    """A native snapshot with 501 ancestors (one more than overlay allows) is made and
    mounts: it holds a copy of its parent, no stack of lowers."""
    require_root_user()
    with opened(NativeSnapshotter, tmp_root / "sn") as sn:
        _assert_top_sees_the_bottom(sn, _chain(sn, 501))


def test_overlay_mounts_the_deepest_stack_it_allows(tmp_root: Path) -> None:
    """The limit is the kernel's: a snapshot with 500 ancestors mounts and sees the
    bottom layer's file; one more is refused."""
    require_root_user()
    with opened(OverlaySnapshotter, tmp_root / "sn") as sn:
        _assert_top_sees_the_bottom(sn, _chain(sn, 500))
        sn.commit("c500", "top")
        with pytest.raises(ResourceExhausted, match="more than 500 layers"):
            sn.prepare("beyond", "c500")


@pytest.mark.parametrize("snapshotter", ["overlay", "erofs"])
def test_unpack_refuses_an_image_deeper_than_the_limit(
        snapshotter: str, tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 layers where 3 may stack: refused before any layer is written, as the CLI
    says it (exit 9); native unpacks the same image."""
    require_root_user()
    for cls in LIMITED:
        monkeypatch.setattr(cls, "MAX_DEPTH", 3)
    w = tmp_root / "w"
    layers = [f.layer_from_entries([f.File(f"f{i}", b"x")], w / f"l{i}") for i in range(4)]
    f.build_oci_layout(w / "layout", layers, ref_name="deep:4")
    tar = f.as_tar(w / "layout", w / "deep.tar")
    root = Root(tmp_root / "root")
    try:
        svc = ImageService(root, snapshotter=snapshotter)
        with pytest.raises(ResourceExhausted) as err:
            svc.import_(tar)
        assert str(err.value) == ("image has 4 layers: a container on it would stack more "
                                  "than 3, the snapshotter's limit")
        assert err.value.exit_code == 9
        assert list(svc.snapshots.walk()) == []
        native = ImageService(root, snapshotter="native")
        assert native.unpack("deep:4").chain_id == chain_ids([x.diff_id for x in layers])[-1]
    finally:
        root.close()


def test_a_parent_chain_edited_into_a_loop_ends_with_an_error(tmp_root: Path) -> None:
    """Two rows each naming the other as parent: the walk stops at its bound and
    says the metadata is damaged (the recursive query ran forever)."""
    require_root_user()
    with opened(NativeSnapshotter, tmp_root / "sn") as sn:
        _chain(sn, 2)
        db = next(tmp_root.glob("sn/metadata.db"))
    conn = sqlite3.connect(db)
    with conn:
        (c0,) = conn.execute("SELECT id FROM snapshots WHERE key='c0'").fetchone()
        (c1,) = conn.execute("SELECT id FROM snapshots WHERE key='c1'").fetchone()
        conn.execute("UPDATE snapshots SET parent_id=? WHERE id=?", (c1, c0))
    conn.close()
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            with opened(NativeSnapshotter, tmp_root / "sn") as again:
                again.prepare("on-loop", "c1")
            outcome.append(None)
        except LaminaError as exc:
            outcome.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(60)
    assert outcome, "the parent walk did not end within 60 s"
    assert isinstance(outcome[0], Internal), outcome
    assert "parents form a loop in the metadata" in str(outcome[0])
