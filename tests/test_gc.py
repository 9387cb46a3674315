"""Garbage collection: exactly the unreachable is removed, over real stores and mounts."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user

from lamina.cli import main
from lamina.images.service import ImageService
from lamina.labels import GC_ROOT, LAYER_MTREE
from lamina.metadata.check import check
from lamina.metadata.containers import Container, ContainerStore
from lamina.metadata.gc import collect
from lamina.metadata.leases import LeaseManager
from lamina.metadata.root import Root
from lamina.mounts.mount import temp_mount
from lamina.oci.identity import chain_ids

SNAPSHOTTERS = ["overlay", "native"]


@dataclass(frozen=True)
class Images:
    tar: Path  # both images: a:1 = base + a1 + a2, b:1 = base + b1
    solo: Path  # only s:1 = base + s1
    a: f.ImageRef
    b: f.ImageRef
    base: f.Layer


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    require_root_user()
    w = tmp_path_factory.mktemp("gc-images")
    base = f.minimal_layer(w)
    a1 = f.layer_from_entries([f.Dir("a"), f.File("a/one.txt", "a1")], w)
    a2 = f.layer_from_entries([f.File("a/two.txt", "a2")], w)
    b1 = f.layer_from_entries([f.File("b.txt", "only in b")], w)
    s1 = f.layer_from_entries([f.File("s.txt", "solo")], w)
    a = f.build_oci_layout(w / "layout", [base, a1, a2], ref_name="a:1")
    b = f.build_oci_layout(w / "layout", [base, b1], ref_name="b:1")
    f.build_oci_layout(w / "solo", [base, s1], ref_name="s:1")
    return Images(f.as_tar(w / "layout", w / "two.tar"), f.as_tar(w / "solo", w / "solo.tar"),
                  a, b, base)


def _blob_digests(root: Root) -> set[str]:
    return {i.digest for i in root.content().walk()}


def _blob_files(root: Root) -> set[str]:
    return {f"sha256:{n}" for n in os.listdir(root.content_dir / "blobs" / "sha256")}


def _mtrees(root: Root, sn: str) -> set[str]:
    """Tree manifests the snapshots of ``sn`` keep (one per unpacked layer)."""
    return {i.labels[LAYER_MTREE] for i in root.snapshotter(sn).walk() if LAYER_MTREE in i.labels}


def _keys(root: Root, sn: str) -> set[str]:
    return {i.name for i in root.snapshotter(sn).walk()}


@pytest.fixture(params=SNAPSHOTTERS)
def loaded(request: pytest.FixtureRequest, images: Images,
           tmp_root: Path) -> tuple[Root, ImageService, str]:
    sn = str(request.param)
    root = Root(tmp_root / "root")
    svc = ImageService(root, snapshotter=sn)
    svc.import_(images.tar)
    request.addfinalizer(root.close)
    request.addfinalizer(svc.close)
    return root, svc, sn


def test_removes_only_the_removed_images_unique_blobs_and_snapshots(
        loaded: tuple[Root, ImageService, str], images: Images, tmp_root: Path) -> None:
    root, svc, sn = loaded
    a_chains = chain_ids(images.a.diff_ids)
    b_chains = chain_ids(images.b.diff_ids)
    before_blobs = _blob_digests(root)
    before_keys = _keys(root, sn)
    assert collect(root).content == [] and _blob_digests(root) == before_blobs  # all in use

    # each unpacked layer's tree manifest lives as long as its snapshot
    mtrees = {k: i.labels[LAYER_MTREE] for k in (a_chains[1], a_chains[2])
              for i in [root.snapshotter(sn).stat(k)]}
    svc.remove("a:1")
    a_only = {images.a.manifest_digest, images.a.config_digest,
              images.a.layers[1].digest, images.a.layers[2].digest, *mtrees.values()}
    dry = collect(root, dry_run=True)
    assert dry.dry_run
    assert {d for d, _ in dry.content} == a_only
    assert _blob_digests(root) == before_blobs and _keys(root, sn) == before_keys

    report = collect(root)
    assert {d for d, _ in report.content} == a_only
    assert report.content == dry.content and report.snapshots == dry.snapshots
    assert all(size > 0 for _, size in report.content)
    # a's own layers, leaf first; the shared base stays
    assert [(n, k) for n, k, _ in report.snapshots] == [(sn, a_chains[2]), (sn, a_chains[1])]
    assert report.bytes_freed == sum(s for _, s in report.content) + sum(
        s for _, _, s in report.snapshots)
    assert _blob_digests(root) == before_blobs - a_only == _blob_files(root)
    assert _keys(root, sn) == {a_chains[0], *b_chains} == {*b_chains}
    assert check(root).ok
    # a second collection finds nothing more
    again = collect(root)
    assert again.content == [] and again.snapshots == []

    # the remaining image still unpacks and mounts
    assert svc.unpack("b:1").extracted == 0
    target = tmp_root / "mnt"
    svc.mount("b:1", target)
    try:
        assert (target / "b.txt").read_text() == "only in b"
        assert (target / "bin" / "sh").exists()
        assert not (target / "a").exists()
    finally:
        svc.unmount(target)
    # and the removed one comes back when imported again
    svc.import_(images.tar)
    assert _keys(root, sn) == {*a_chains, *b_chains}


def test_gc_root_and_user_references_keep_their_targets(
        loaded: tuple[Root, ImageService, str], images: Images) -> None:
    root, svc, sn = loaded
    content, snaps = root.content(), root.snapshotter(sn)
    b_top = chain_ids(images.b.diff_ids)[-1]
    pinned = content.add(b"pinned", labels={GC_ROOT: "yes"}).digest
    loose = content.add(b"loose").digest
    via_label = content.add(b"reached by a label").digest
    via_dotted = content.add(b"reached by a dotted label").digest
    holder = content.add(b"holder", labels={
        GC_ROOT: "x",
        "containerd.io/gc.ref.content": via_label,
        "containerd.io/gc.ref.content.custom.1": via_dotted,
        f"containerd.io/gc.ref.snapshot.{sn}": "held-by-blob",
        f"containerd.io/gc.ref.snapshot.{sn}/second": "held-by-blob-2",
    }).digest
    snaps.prepare("held-by-blob", b_top)
    snaps.prepare("held-by-blob-2", "")
    snaps.prepare("rooted", "", labels={GC_ROOT: "1"})
    snaps.prepare("loose-snap", b_top)
    labelled_parent = content.add(b"from a snapshot label").digest
    snaps.prepare("snap-refs", "", labels={GC_ROOT: "1",
                                           "containerd.io/gc.ref.content.x": labelled_parent})
    svc.remove("a:1")
    svc.remove("b:1")
    report = collect(root)
    removed_keys = {k for _, k, _ in report.snapshots}
    assert "loose-snap" in removed_keys
    assert loose in {d for d, _ in report.content}
    # b's layer snapshots stay (held through a blob's label), and so do their tree manifests
    mtrees = {snaps.stat(k).labels[LAYER_MTREE] for k in chain_ids(images.b.diff_ids)}
    keep = {pinned, via_label, via_dotted, holder, labelled_parent, *mtrees}
    assert keep <= _blob_digests(root)
    assert _blob_digests(root) == keep  # every image blob went
    # the snapshot a blob label holds keeps its whole parent chain
    assert _keys(root, sn) == {"held-by-blob", "held-by-blob-2", "rooted", "snap-refs",
                               *chain_ids(images.b.diff_ids)}
    # dropping the reference lets it all go
    content.delete(holder)
    collect(root)
    assert _keys(root, sn) == {"rooted", "snap-refs"}
    assert _blob_digests(root) == {pinned, labelled_parent}


def test_containers_keep_their_snapshots_and_revisions(
        loaded: tuple[Root, ImageService, str], images: Images) -> None:
    from lamina.containers.service import ContainerService

    root, svc, sn = loaded
    snaps = root.snapshotter(sn)
    b_chains = chain_ids(images.b.diff_ids)
    a_chains = chain_ids(images.a.diff_ids)
    # a bare container record (no gc.root label on its snapshot) holds it
    snaps.prepare("bare-rw", b_chains[-1])
    store = ContainerStore(root.metadata_path)
    store.create(Container(id="bare", image="b:1", snapshotter=sn, snapshot_key="bare-rw"))
    # a container made by the service: revisions labelled gc.root
    cs = ContainerService(root, snapshotter=sn, images=svc)
    c = cs.create("a:1", "svc")
    first = c.snapshot_key
    with temp_mount(snaps.mounts(first)) as mnt:
        Path(mnt, "written.txt").write_text("by the container")
    c = cs.upgrade("svc", "b:1")
    assert c.snapshot_key != first
    svc.remove("a:1")
    svc.remove("b:1")
    report = collect(root)
    # the old revision (a's chain) and the new one (b's chain) survive, images' blobs go
    assert _keys(root, sn) == {"bare-rw", first, c.snapshot_key, *a_chains, *b_chains}
    assert {k for _, k, _ in report.snapshots} == set()
    assert _blob_digests(root) == _mtrees(root, sn)  # the layers' own manifests stay
    with temp_mount(snaps.mounts(c.snapshot_key)) as mnt:
        assert Path(mnt, "written.txt").read_text() == "by the container"
    # rollback still finds the previous revision
    assert cs.rollback("svc").snapshot_key == first
    # removing the containers frees everything
    cs.remove("svc")
    store.delete("bare")
    store.close()
    cs.close()
    collect(root)
    assert _keys(root, sn) == set()
    assert check(root).ok


def test_mounted_snapshot_is_kept_while_mounted(
        loaded: tuple[Root, ImageService, str], images: Images) -> None:
    root, svc, sn = loaded
    snaps = root.snapshotter(sn)
    top = chain_ids(images.b.diff_ids)[-1]
    snaps.prepare("in-use", top)
    with temp_mount(snaps.mounts("in-use")) as mnt:
        Path(mnt, "live.txt").write_text("live")
        svc.remove("a:1")
        svc.remove("b:1")
        report = collect(root)
        assert "in-use" not in {k for _, k, _ in report.snapshots}
        assert Path(mnt, "live.txt").read_text() == "live"
        assert {"in-use", *chain_ids(images.b.diff_ids)} <= _keys(root, sn)
    collect(root)
    assert _keys(root, sn) == set()


def test_lease_protects_what_is_written_while_it_is_held(tmp_root: Path) -> None:
    root = Root(tmp_root / "root")
    content = root.content()
    leases = LeaseManager(root.metadata_path)
    before = content.add(b"written before the lease").digest
    time.sleep(0.05)  # more than gc's slack on lease times
    with leases.held(purpose="test") as lease:
        during = content.add(b"written while the lease is held").digest
        sn = root.snapshotter("native")
        sn.prepare("made-under-lease", "")
        report = collect(root)
        assert {d for d, _ in report.content} == {before}  # older than the lease
        assert _blob_digests(root) == {during}
        assert _keys(root, "native") == {"made-under-lease"}
        assert [x.id for x in leases.list()] == [lease.id]
    assert leases.list() == []  # held() deletes its lease
    collect(root)
    assert _blob_digests(root) == set() and _keys(root, "native") == set()
    leases.close()
    root.close()


def test_expired_lease_protects_nothing(tmp_root: Path) -> None:
    root = Root(tmp_root / "root")
    content = root.content()
    leases = LeaseManager(root.metadata_path)
    leases.create("gone", expire=timedelta(0))
    kept = leases.create("kept-for-later", expire=timedelta(hours=1))
    leases.delete(kept.id)
    digest = content.add(b"after an expired lease").digest
    report = collect(root)
    assert {d for d, _ in report.content} == {digest}
    assert leases.list() == []  # collection drops expired leases
    leases.close()
    root.close()


def test_lease_labels_reference_objects(tmp_root: Path) -> None:
    root = Root(tmp_root / "root")
    content = root.content()
    sn = root.snapshotter("native")
    old_blob = content.add(b"old blob").digest
    sn.prepare("old-snap", "")
    leases = LeaseManager(root.metadata_path)
    lease = leases.create("mount-lease", labels={
        "containerd.io/gc.ref.content.0": old_blob,
        "containerd.io/gc.ref.snapshot.native": "old-snap",
    })
    assert collect(root).content == []
    assert _keys(root, "native") == {"old-snap"}
    leases.delete(lease.id)
    collect(root)
    assert _blob_digests(root) == set() and _keys(root, "native") == set()
    leases.close()
    root.close()


def test_a_reference_added_before_its_lease_ended_is_followed(
        tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race CI found: an unpack labels an image's config with its top
    snapshot and drops its lease while a collection is between listing the
    objects (config not yet labelled) and reading the roots (lease gone)."""
    import dataclasses

    import lamina.metadata.gc
    from lamina.metadata.images import Image, ImageStore
    from lamina.oci.types import Descriptor

    root = Root(tmp_root / "root")
    content, sn = root.content(), root.snapshotter("native")
    leases = LeaseManager(root.metadata_path)
    images = ImageStore(root.metadata_path)
    lease = leases.create("unpacking")
    config = content.add(b'{"config": "of the image"}')
    sn.prepare("top-active", "")
    sn.commit("top", "top-active")
    images.create(Image("img:1", Descriptor("application/octet-stream", config.digest,
                                            config.size)))
    real_read = lamina.metadata.gc._RootReader.read
    finished: list[bool] = []

    def unpack_finishes_first(self: lamina.metadata.gc._RootReader) -> lamina.metadata.gc._Roots:
        if not finished:  # once, after the objects were listed
            finished.append(True)
            label = {"containerd.io/gc.ref.snapshot.native": "top"}
            content.update(dataclasses.replace(config, labels=label),
                           "labels.containerd.io/gc.ref.snapshot.native")
            leases.delete(lease.id)
        return real_read(self)

    monkeypatch.setattr(lamina.metadata.gc._RootReader, "read", unpack_finishes_first)
    report = collect(root)
    assert finished
    assert report.snapshots == [] and report.content == []
    assert _keys(root, "native") == {"top"}
    images.delete("img:1")
    assert [k for _, k, _ in collect(root).snapshots] == ["top"]
    images.close()
    leases.close()
    root.close()


def test_unpack_holds_a_snapshot_it_reuses(images: Images, tmp_root: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection right after an unpack found a garbage layer to reuse keeps it."""
    root = Root(tmp_root / "root")
    svc = ImageService(root, snapshotter="overlay")
    svc.import_(images.tar)
    svc.remove("a:1")
    svc.remove("b:1")  # every snapshot is garbage now, the shared base layer too
    time.sleep(0.05)  # more than gc's slack on lease times: the next lease is newer
    base = chain_ids(images.a.diff_ids)[0]
    real_add = LeaseManager.add_resource
    collected: list[set[str]] = []

    def add_then_collect(self: LeaseManager, lease_id: str, kind: str, ident: str) -> None:
        real_add(self, lease_id, kind, ident)
        if ident == base and not collected:
            collected.append({k for _, k, _ in collect(root).snapshots})

    monkeypatch.setattr(LeaseManager, "add_resource", add_then_collect)
    svc.import_(images.solo)
    assert collected and base not in collected[0]
    assert chain_ids(images.a.diff_ids)[-1] in collected[0]  # the rest did go
    assert svc.unpack("s:1").extracted == 0
    monkeypatch.undo()
    collect(root)
    assert check(root).ok
    svc.close()
    root.close()


def test_import_under_concurrent_gc_loses_nothing(images: Images, tmp_root: Path) -> None:
    root_dir = tmp_root / "root"
    stop = threading.Event()
    errors: list[BaseException] = []
    runs = [0]

    def gc_loop() -> None:
        r = Root(root_dir)
        try:
            while not stop.is_set():
                collect(r)
                runs[0] += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            r.close()

    t = threading.Thread(target=gc_loop)
    t.start()
    try:
        root = Root(root_dir)
        svc = ImageService(root, snapshotter="overlay")
        for _ in range(2):
            svc.import_(images.tar)
            svc.remove("a:1")
            svc.remove("b:1")
        svc.import_(images.tar)
    finally:
        stop.set()
        t.join()
    assert not errors
    assert runs[0] > 0
    collect(root)
    report = check(root)
    assert report.ok, report.problems
    for name, ref in (("a:1", images.a), ("b:1", images.b)):
        assert svc.unpack(name).chain_id == chain_ids(ref.diff_ids)[-1]
    svc.close()
    root.close()


def _cli(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--root", str(root), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_gc_and_image_rm_sync(images: Images, tmp_root: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    root_dir = tmp_root / "root"
    assert _cli(capsys, root_dir, "image", "import", str(images.solo))[0] == 0
    assert _cli(capsys, root_dir, "image", "import", str(images.tar))[0] == 0
    code, out, _ = _cli(capsys, root_dir, "gc", "--json")
    assert code == 0 and json.loads(out)["content"] == []
    assert _cli(capsys, root_dir, "image", "rm", "a:1")[0] == 0
    code, out, _ = _cli(capsys, root_dir, "gc", "--dry-run")
    assert code == 0 and "would remove content " + images.a.manifest_digest in out
    assert "would free" in out
    code, out, _ = _cli(capsys, root_dir, "gc", "--dry-run", "--json")
    dry = json.loads(out)
    assert dry["dry_run"] and len(dry["snapshots"]) == 2
    code, out, _ = _cli(capsys, root_dir, "gc")
    assert code == 0
    assert f"removed content {images.a.config_digest}" in out
    assert f"removed snapshot overlay/{chain_ids(images.a.diff_ids)[-1]}" in out
    assert f"freed {dry['bytes_freed']} bytes" in out
    # image rm --sync of everything leaves no blobs and no snapshots
    code, _, _ = _cli(capsys, root_dir, "image", "rm", "--sync", "b:1", "s:1")
    assert code == 0
    root = Root(root_dir)
    assert _blob_digests(root) == set() and _blob_files(root) == set()
    assert _keys(root, "overlay") == set()
    assert os.listdir(root_dir / "snapshots" / "overlay" / "snapshots") == []
    root.close()


def test_image_rm_sync_of_a_sole_image(images: Images, tmp_root: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    root_dir = tmp_root / "root"
    assert _cli(capsys, root_dir, "--snapshotter", "native", "image", "import",
                str(images.solo))[0] == 0
    root = Root(root_dir)
    assert len(_keys(root, "native")) == 2 and len(_blob_digests(root)) == 4 + 2  # +mtrees
    assert _cli(capsys, root_dir, "image", "rm", "--sync", "s:1")[0] == 0
    assert _blob_digests(root) == set() and _blob_files(root) == set()
    assert _keys(root, "native") == set()
    root.close()


def test_gc_removes_what_killed_work_left_in_snapshot_directories(
        loaded: tuple[Root, ImageService, str]) -> None:
    """The failure model: a directory a killed command was building (``new-``, no
    row, no flock) goes at the next ``gc``, as containerd's collector has its
    snapshotters clean up; one a live process holds stays, and so does every
    snapshot (whoever owns it)."""
    import fcntl

    root, _, sn = loaded
    dirs = root.path / "snapshots" / sn / "snapshots"
    before = set(os.listdir(dirs))
    left = dirs / "new-killed01"
    (left / "fs" / "etc").mkdir(parents=True)
    (left / "fs" / "etc" / "half-written").write_bytes(b"x" * 100)
    live = dirs / "new-building"
    (live / "fs").mkdir(parents=True)
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        collect(root)
        assert set(os.listdir(dirs)) == before | {"new-building"}
    finally:
        os.close(fd)
    collect(root)
    assert set(os.listdir(dirs)) == before
    assert check(root).problems == []
