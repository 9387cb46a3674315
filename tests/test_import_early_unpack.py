"""Import unpacks an OCI layout's layers while the archive is still being read
(:mod:`lamina.images.early_unpack`): documents first, then the layers in the
order the unpack reads them, each unpacked once its blob is committed.

The layers here are small, so the importer's first-pass bound
(:data:`lamina.images.importer.SMALL_BLOB`) is lowered below them.
"""

from __future__ import annotations

import os
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user

from lamina.errors import InvalidArgument
from lamina.images import importer
from lamina.images.service import ImageService
from lamina.labels import UNCOMPRESSED
from lamina.metadata.root import Root
from lamina.oci.identity import chain_ids
from lamina.util import crash
from lamina.util.progress import Progress


@pytest.fixture(autouse=True)
def _small_first_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "SMALL_BLOB", 2048)


def _layers(w: Path, n: int = 3) -> list[f.Layer]:
    # random contents: each gzip stays larger than the lowered first-pass bound
    return [f.layer_from_entries([f.Dir("d"), f.File(f"d/f{i}", os.urandom(64 << 10))],
                                 w / f"l{i}") for i in range(n)]


def _points(monkeypatch: pytest.MonkeyPatch, *, hold_at: int) -> list[str]:
    """The crash points passed, in order; the ``hold_at``-th blob stored waits
    (20 s at most) for a snapshot to be committed before the import goes on."""
    seen: list[str] = []
    committed = threading.Event()

    def point(name: str) -> None:
        seen.append(name)
        if name == "unpack.committed":
            committed.set()
        elif name == "import.blob-stored" and seen.count(name) == hold_at:
            committed.wait(20)

    monkeypatch.setattr(crash, "point", point)
    return seen


@pytest.mark.parametrize("form", ["tar", "dir"])
def test_layers_are_unpacked_while_the_archive_is_read(
        form: str, tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bottom layer's snapshot is committed before the last blob is stored:
    the unpack did not wait for the whole archive."""
    require_root_user()
    w = tmp_root / "w"
    layers = _layers(w)
    f.build_oci_layout(w / "layout", layers, ref_name="early:1")
    source = f.as_tar(w / "layout", w / "early.tar") if form == "tar" else w / "layout"
    seen = _points(monkeypatch, hold_at=4)  # of 5: config, manifest, 3 layers
    root = Root(tmp_root / "root")
    svc = ImageService(root, snapshotter="native")
    svc.import_(source)
    chains = chain_ids([lyr.diff_id for lyr in layers])
    assert sorted(i.name for i in svc.snapshots.walk()) == sorted(chains)
    committed = seen.index("unpack.committed")
    stored = len(seen) - 1 - seen[::-1].index("import.blob-stored")
    assert committed < stored, seen
    assert svc.unpack("early:1").chain_id == chains[-1]
    root.close()


def test_a_wrong_diff_id_fails_the_import_after_the_archive_is_stored(
        tmp_root: Path) -> None:
    """A layer whose DiffID the config contradicts fails the import as before: the
    image is recorded, that layer and those above it get no snapshot."""
    require_root_user()
    w = tmp_root / "w"
    layers = _layers(w)
    lying = replace(layers[1], diff_id="sha256:" + "0" * 64)
    f.build_oci_layout(w / "lying", [layers[0], lying, layers[2]], ref_name="lie:1")
    lie = [layers[0].diff_id, lying.diff_id, layers[2].diff_id]
    root = Root(tmp_root / "root")
    svc = ImageService(root, snapshotter="native")
    with pytest.raises(InvalidArgument, match="diff id mismatch"):
        svc.import_(f.as_tar(w / "lying", w / "lying.tar"))
    assert [i.name for i in root.images().list()] == ["lie:1"]
    assert [i.name for i in svc.snapshots.walk()] == chain_ids(lie)[:1]
    # the committed layer was labelled as it was committed, not after the others
    labels = [root.content().info(lyr.digest).labels for lyr in layers[:2]]
    assert labels[0][UNCOMPRESSED] == layers[0].diff_id and UNCOMPRESSED not in labels[1]
    root.close()


def test_a_truncated_archive_fails_with_the_archive_error(tmp_root: Path) -> None:
    """The archive ends in the middle of a layer the early unpack waits for: the
    import's own error is raised, nothing is recorded."""
    require_root_user()
    w = tmp_root / "w"
    f.build_oci_layout(w / "layout", _layers(w), ref_name="cut:1")
    tar = f.as_tar(w / "layout", w / "cut.tar")
    with tarfile.open(tar) as t:
        big = [m for m in t.getmembers() if m.size > 2048]
    big.sort(key=lambda m: m.offset_data)
    with open(tar, "r+b") as out:  # cut inside the last large member
        out.truncate(big[-1].offset_data + big[-1].size // 2)
    root = Root(tmp_root / "root")
    svc = ImageService(root, snapshotter="native")
    with pytest.raises(InvalidArgument, match="not a readable image archive"):
        svc.import_(tar)
    assert [i.name for i in root.images().list()] == []
    root.close()


class _Seen(Progress):
    """Remembers which items the unpack has read bytes of."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()
        self.changed = threading.Condition()

    def event(self, phase: str, item: str, *, done: int = 0, total: int = 0,
              status: str = "") -> None:
        if phase == "unpack" and done > 0:
            with self.changed:
                self.read.add(item)
                self.changed.notify_all()


def test_a_layer_is_read_while_its_blob_is_stored(
        tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unpack reads the bottom layer before its blob is committed (from the
    growing ingest), and still commits its snapshot only after the blob."""
    require_root_user()
    w = tmp_root / "w"
    layers = _layers(w)
    f.build_oci_layout(w / "layout", layers, ref_name="growing:1")
    seen = _Seen()
    points: list[str] = []
    early: list[bool] = []  # whether the unpack read the bottom layer before its commit
    bottom = layers[0].digest

    def point(name: str) -> None:
        points.append(name)
        if name == "content.commit.before-fsync" and points.count(name) == 3:  # the bottom
            with seen.changed:  # layer's, after the manifest's and the config's
                early.append(seen.changed.wait_for(lambda: bottom in seen.read, timeout=20))

    monkeypatch.setattr(crash, "point", point)
    root = Root(tmp_root / "root")
    svc = ImageService(root, snapshotter="native", progress=seen)
    svc.import_(f.as_tar(w / "layout", w / "growing.tar"))
    assert early == [True]
    stored = [n for n, p in enumerate(points) if p == "import.blob-stored"]
    assert points.index("unpack.committed") > stored[2], points  # the bottom layer's blob
    assert len(list(svc.snapshots.walk())) == len(layers)
    root.close()
