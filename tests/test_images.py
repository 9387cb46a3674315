"""Image import, unpack, export — checked against containerd 1.6 and skopeo.

The rich image is a debootstrap minbase rootfs plus layers exercising every
file kind, whiteouts, opaque directories and type changes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import imagefactory as f
import pytest
import treesum
from conftest import require_root_user, require_tools
from containerd_peer import private_containerd

from lamina.errors import InvalidArgument, NotFound, ResourceExhausted
from lamina.images.service import ImageService
from lamina.metadata.root import Root
from lamina.oci.identity import chain_id, chain_ids

SNAPSHOTTERS = ["overlay", "native"]


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, list[str]]:
    """(OCI layout tar of the rich image, its DiffIDs)."""
    require_root_user()
    w = tmp_path_factory.mktemp("rich")
    layers = [f.debootstrap_layer(cache_dir), *f.rich_layers(w)]
    f.build_oci_layout(w / "layout", layers, ref_name="test:latest")
    return f.as_tar(w / "layout", w / "image.tar"), [lyr.diff_id for lyr in layers]


def _containerd_unpack(tar: Path, diff_ids: list[str], state: Path) -> dict[str, object]:
    """The image in ``tar`` as containerd 1.6 unpacks it with its native snapshotter."""
    # the view below holds no lease: containerd collects only when asked
    with private_containerd(state, gc_on_request=True) as ctrd:
        ctrd.ctr("images", "import", "--snapshotter", "native", str(tar))
        ctrd.ctr("snapshots", "--snapshotter", "native", "view", "parity", chain_id(diff_ids))
        words = ctrd.ctr("snapshots", "--snapshotter", "native", "mounts", "/x",
                         "parity").stdout.split()
        # "mount -t bind SOURCE /x -o rbind,ro": a native snapshot is a plain directory
        return treesum.summarize(words[3], dir_mtimes=False)


@pytest.fixture(scope="module")
def containerd_tree(rich: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, object]:
    """The rich image as containerd 1.6 unpacks it."""
    tar, diff_ids = rich
    return _containerd_unpack(tar, diff_ids, tmp_path_factory.mktemp("ctrd"))


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_unpack_matches_containerd(snapshotter: str, rich: tuple[Path, list[str]],
                                   containerd_tree: dict[str, object], tmp_root: Path) -> None:
    tar, diff_ids = rich
    root = Root(tmp_root / "root")
    svc = ImageService(root, snapshotter=snapshotter)
    try:
        (image,) = svc.import_(tar)
        assert image.name == "test:latest"
        # containerd's native snapshotter does not keep directory mtimes across its
        # per-layer copies, so those are compared in the RICH_EXPECTED check below.
        svc.mount("test:latest", tmp_root / "mnt")
        mine = treesum.summarize(tmp_root / "mnt", dir_mtimes=False)
        f.RICH_EXPECTED.verify(tmp_root / "mnt")
        svc.unmount(tmp_root / "mnt")
        assert treesum.diff(containerd_tree, mine) == []
        # every layer is a committed snapshot named by its ChainID, labelled
        names = {i.name: i for i in root.snapshotter(snapshotter).walk()}
        for cid in chain_ids(diff_ids):
            assert names[cid].labels["containerd.io/snapshot.ref"] == cid
        # blobs carry containerd's GC references and uncompressed labels
        manifest, config = svc.resolve("test:latest")
        content = root.content()
        for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            assert content.info(layer.digest).labels["containerd.io/uncompressed"] == diff_id
        cfg_labels = content.info(manifest.config.digest).labels
        assert cfg_labels[f"containerd.io/gc.ref.snapshot.{snapshotter}"] == chain_id(diff_ids)
        assert root.snapshotter(snapshotter).check() == []  # type: ignore[attr-defined]
    finally:
        svc.close()
        root.close()


def _symlinked_parents_image(w: Path) -> tuple[Path, list[str]]:
    """Layers writing through symlinked directories of lower layers (merged-/usr
    style ``lib -> usr/lib``, absolute ``var/run -> /run``, a chain of links)."""
    lower = [
        f.Dir("usr"), f.Dir("usr/lib"), f.File("usr/lib/old", "old\n"),
        f.File("usr/lib/keep", "keep\n"), f.Symlink("lib", "usr/lib"), f.Dir("run"),
        f.Dir("var"), f.Symlink("var/run", "/run"), f.Dir("opt"), f.Dir("opt/real"),
        f.File("opt/real/stale", "stale\n"), f.Symlink("opt/link", "real"),
        f.Symlink("chain", "opt/link"),
    ]
    upper = [  # no entries for the symlinked directories themselves
        f.File("lib/through-rel", "rel\n"), f.File("var/run/through-abs.pid", "1\n"),
        f.Whiteout("lib/old"), f.Dir("lib/newdir", 0o710), f.File("lib/newdir/f", "f\n"),
        f.Hardlink("hl", "lib/keep"), f.File("chain/via-chain", "c\n"), f.Opaque("opt/link"),
    ]
    layers = [f.minimal_layer(w), f.layer_from_entries(lower, w),
              f.layer_from_entries(upper, w)]
    f.build_oci_layout(w / "layout", layers, ref_name="links:1")
    return f.as_tar(w / "layout", w / "links.tar"), [lyr.diff_id for lyr in layers]


@pytest.mark.usefixtures("require_root")
def test_symlinked_parents_unpack_as_containerd_does(
        tmp_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    tar, diff_ids = _symlinked_parents_image(tmp_root / "image")
    theirs = _containerd_unpack(tar, diff_ids, tmp_path_factory.mktemp("ctrd"))
    for snapshotter in SNAPSHOTTERS:  # overlay: the staged apply falls back to a mount
        root = Root(tmp_root / f"root-{snapshotter}")
        svc = ImageService(root, snapshotter=snapshotter)
        mnt = tmp_root / f"mnt-{snapshotter}"
        try:
            svc.import_(tar)
            svc.mount("links:1", mnt)
            try:
                mine = treesum.summarize(mnt, dir_mtimes=False)
                assert sorted(os.listdir(mnt / "usr/lib")) == ["keep", "newdir", "through-rel"]
                assert (mnt / "run/through-abs.pid").read_text() == "1\n"
                assert os.listdir(mnt / "opt/real") == ["via-chain"]
            finally:
                svc.unmount(mnt)
            assert treesum.diff(theirs, mine) == [], snapshotter
        finally:
            svc.close()
            root.close()


def test_docker_save_and_export_roundtrip(tmp_root: Path) -> None:
    require_tools("skopeo")
    w = tmp_root / "w"
    w.mkdir()
    layers = [f.minimal_layer(w), *f.rich_layers(w, compression="none")]
    f.build_docker_save(w / "docker.tar", layers, "example/app:v1")
    root = Root(tmp_root / "a")
    svc = ImageService(root)
    (image,) = svc.import_(w / "docker.tar")
    assert image.name == "docker.io/example/app:v1"
    top = svc.unpack(image.name).chain_id
    assert top == chain_id([lyr.diff_id for lyr in layers])
    svc.export([image.name], w / "export.tar")
    # skopeo reads what lamina exports
    out = subprocess.run(["skopeo", "inspect", f"oci-archive:{w / 'export.tar'}"],
                         capture_output=True, text=True, check=True).stdout
    assert len(json.loads(out)["Layers"]) == len(layers)
    # and a second root imports it to the same snapshot chain
    other = ImageService(Root(tmp_root / "b"), snapshotter="native")
    (again,) = other.import_(w / "export.tar")
    assert again.name == image.name and other.unpack(again.name).chain_id == top
    svc.close()
    other.close()


def test_concurrent_unpacks_extract_each_layer_once(rich: tuple[Path, list[str]],
                                                    tmp_root: Path) -> None:
    tar, diff_ids = rich
    root_dir = tmp_root / "root"
    svc = ImageService(Root(root_dir))
    svc.import_(tar, unpack=False)
    svc.close()
    # threads: two services on one root, started together
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def unpack() -> None:
        s = ImageService(Root(root_dir))
        try:
            barrier.wait()
            results.append(s.unpack("test:latest").extracted)
        except BaseException as exc:
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=unpack) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(results) == len(diff_ids)  # each layer extracted exactly once between them
    # processes: a fresh snapshotter on the same root, two CLIs at once
    cmd = [sys.executable, "-m", "lamina", "--root", str(root_dir),
           "--snapshotter", "native", "image", "unpack", "test:latest"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    extracted = [int(o.split("(")[1].split()[0]) for o, _ in outs]
    assert sum(extracted) == len(diff_ids)
    # the per-chain unpack locks go with their unpacks: no file a chain, for ever
    assert not list((root_dir / "locks").glob("unpack-*"))


def test_an_import_whose_blob_another_import_stores_meanwhile_succeeds(
        tmp_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two imports of one image at once: a blob the other import commits between
    this one's look-up and its writer is there, not an AlreadyExists failure (three
    CLIs importing one image on a fresh root failed so, about one round in 15)."""
    layer = f.layer_from_entries([f.Dir("d"), f.File("d/f", b"x" * 4096)], tmp_path / "l")
    f.build_oci_layout(tmp_path / "layout", [layer], ref_name="twice:latest")
    tar = f.as_tar(tmp_path / "layout", tmp_path / "image.tar")
    first = ImageService(Root(tmp_root / "root"))
    first.import_(tar, unpack=False)
    first.close()
    svc = ImageService(Root(tmp_root / "root"))
    real_info = svc.content.info
    looked: list[str] = []

    def not_yet(digest: str) -> object:  # the first look-up: before the other's commit
        if digest in looked:
            return real_info(digest)
        looked.append(digest)
        raise NotFound(f"content {digest} not found")

    monkeypatch.setattr(svc.content, "info", not_yet)
    try:
        svc.import_(tar, unpack=False)
    finally:
        monkeypatch.setattr(svc.content, "info", real_info)
    assert layer.digest in looked
    assert svc.images.get("twice:latest").target.digest
    svc.close()


def _put(layout: Path, data: bytes) -> dict[str, object]:
    import hashlib

    hexd = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / hexd).write_bytes(data)
    return {"digest": f"sha256:{hexd}", "size": len(data)}


def _rewrite_config(layout: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Edit the config of the layout's only image, re-linking manifest and index."""
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    manifest = json.loads((layout / "blobs" / "sha256" / mdesc["digest"][7:]).read_bytes())
    cfg = json.loads((layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
    change(cfg)
    manifest["config"].update(_put(layout, json.dumps(cfg).encode()))
    mdesc.update(_put(layout, json.dumps(manifest).encode()))
    (layout / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_bad_layer_leaves_no_snapshot(snapshotter: str, tmp_root: Path) -> None:
    require_root_user()
    w = tmp_root / "w"
    w.mkdir()
    good = f.minimal_layer(w)
    def hostile(out: IO[bytes]) -> None:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name in ("ok", "../../escape"):
                info = tarfile.TarInfo(name)
                info.size = 4
                tar.addfile(info, io.BytesIO(b"boom"))

    evil = f.layer_from_raw(hostile, w)
    f.build_oci_layout(w / "layout", [good, evil], ref_name="evil:1")
    root = Root(tmp_root / "root")
    svc = ImageService(root, snapshotter=snapshotter)
    with pytest.raises(InvalidArgument):
        svc.import_(w / "layout")
    sn = root.snapshotter(snapshotter)
    names = [i.name for i in sn.walk()]
    assert names == [good.diff_id]  # the good base layer only; no active leftovers
    assert sn.check() == []  # type: ignore[attr-defined]
    assert not (tmp_root / "escape").exists() and not Path("/escape").exists()
    svc.close()


def test_wrong_diff_id_is_refused(tmp_root: Path) -> None:
    require_root_user()
    w = tmp_root / "w"
    w.mkdir()
    good = f.minimal_layer(w)
    f.build_oci_layout(w / "layout", [good], ref_name="lie:1")
    _rewrite_config(w / "layout", lambda cfg: cfg["rootfs"].update(diff_ids=["sha256:" + "0" * 64]))
    root = Root(tmp_root / "root")
    svc = ImageService(root)
    with pytest.raises(InvalidArgument, match="diff id mismatch"):
        svc.import_(w / "layout")
    assert list(root.snapshotter("overlay").walk()) == []
    assert os.listdir(tmp_root / "root" / "snapshots" / "overlay" / "snapshots") == []
    svc.close()


@pytest.mark.parametrize("form", ["tar", "stream", "dir"])
def test_an_archive_past_the_member_limit_is_refused_and_records_nothing(
        form: str, tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The importer keeps a record of each member of an archive (tarfile's own, then
    lamina's), so an archive of millions of empty files would have run it out of
    memory. Past MAX_ARCHIVE_MEMBERS (lowered here) it is ResourceExhausted, whether
    read from a file, as a stream or from a layout directory, with no image recorded;
    at the limit it imports."""
    from lamina.images import importer

    w = tmp_root / "w"
    w.mkdir()
    image = f.build_oci_layout(w / "layout", [f.minimal_layer(w)], ref_name="many:1")
    with tarfile.open(f.as_tar(image.layout, w / "count.tar")) as counted:
        members = len(counted.getmembers())
    blobs = len(os.listdir(image.layout / "blobs" / "sha256"))
    limit = members if form != "dir" else blobs
    root = Root(tmp_root / "root")
    svc = ImageService(root)

    def source() -> Any:
        tar = f.as_tar(image.layout, w / "image.tar")
        if form == "dir":
            return image.layout
        return tar if form == "tar" else io.BytesIO(tar.read_bytes())

    monkeypatch.setattr(importer, "MAX_ARCHIVE_MEMBERS", limit - 1)
    with pytest.raises(ResourceExhausted, match=f"more than {limit - 1} members"):
        svc.import_(source(), unpack=False)
    assert [i.name for i in root.images().list()] == []
    monkeypatch.setattr(importer, "MAX_ARCHIVE_MEMBERS", limit)
    assert [i.name for i in svc.import_(source(), unpack=False)] == ["many:1"]
    svc.close()
    root.close()


def test_an_archive_lacking_a_layer_blob_is_refused_and_records_nothing(
        tmp_root: Path) -> None:
    """An image whose manifest names a layer the archive does not hold is
    refused before any image is recorded (it was recorded, unpack's NotFound
    swallowed, and the root left naming a blob it did not have)."""
    require_root_user()
    w = tmp_root / "w"
    w.mkdir()
    layer = f.minimal_layer(w)
    f.build_oci_layout(w / "layout", [layer], ref_name="holed:1")
    (w / "layout" / "blobs" / "sha256" / layer.digest.split(":")[1]).unlink()
    root = Root(tmp_root / "root")
    svc = ImageService(root)
    with pytest.raises(InvalidArgument, match="the archive lacks a blob"):
        svc.import_(w / "layout")
    assert [i.name for i in root.images().list()] == []
    svc.close()
    root.close()
