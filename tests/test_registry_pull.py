"""``lamina image pull`` against Debian's docker-registry, with skopeo as the pusher.

The pulled tree must equal the tree ``lamina image import`` makes of the same
OCI layout (itself checked against containerd's in test_images.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
import treesum
from registry_peer import Registry as Peer
from registry_peer import running_registry, skopeo_push

from lamina.errors import NotFound
from lamina.images.pull import pull
from lamina.images.service import ImageService
from lamina.labels import DISTRIBUTION_SOURCE
from lamina.metadata.root import Root
from lamina.remotes.registry import Registry


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> imagefactory.ImageRef:
    work = tmp_path_factory.mktemp("image")
    layers = [imagefactory.minimal_layer(work / "blobs"),
              *imagefactory.rich_layers(work / "blobs")]
    return imagefactory.build_oci_layout(work / "oci", layers, ref_name="rich")


def _tree(root: Path, name: str, mnt: Path) -> dict[str, object]:
    svc = ImageService(Root(root))
    try:
        svc.mount(name, mnt)
        try:
            return treesum.summarize(mnt, dir_mtimes=False)
        finally:
            svc.unmount(mnt)
    finally:
        svc.close()
        svc.root.close()


def _imported_tree(layout: Path, tmp: Path) -> dict[str, object]:
    root = tmp / "imported"
    svc = ImageService(Root(root))
    try:
        svc.import_(layout)
    finally:
        svc.close()
        svc.root.close()
    return _tree(root, "rich", tmp / "mnt-imported")


def lamina(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_pull_equals_import(require_root: None, peer: Peer, image: imagefactory.ImageRef,
                            tmp_root: Path, fmt: str) -> None:
    name = f"{peer.host}/test/rich-{fmt}:1"
    skopeo_push(image.oci_ref, name, fmt=fmt)
    root = tmp_root / "pulled"
    with Registry() as reg, _closing(Root(root)) as r:
        result = pull(reg, name, root=r)
    assert result.image.name == name
    assert result.unpacked is not None and result.unpacked.extracted == len(image.layers)
    assert result.fetched == len(image.layers)  # (the config came as a document)
    pulled = _tree(root, name, tmp_root / "mnt")
    assert treesum.diff(_imported_tree(image.layout, tmp_root), pulled) == []
    # blobs carry containerd's source label
    with _closing(Root(root)) as r:
        info = r.content().info(image.layers[0].digest if fmt == "oci" else
                                result.manifests[0].digest)
        assert info.labels[DISTRIBUTION_SOURCE + peer.host] == f"test/rich-{fmt}"
    # again: everything is there, nothing fetched or extracted
    with Registry() as reg, _closing(Root(root)) as r:
        again = pull(reg, name, root=r)
    assert again.fetched == 0 and again.unpacked is not None and again.unpacked.extracted == 0


def test_pull_cli(require_root: None, peer: Peer, image: imagefactory.ImageRef,
                  tmp_root: Path) -> None:
    name = f"{peer.host}/test/cli:1"
    skopeo_push(image.oci_ref, name)
    proc = lamina(tmp_root, "image", "pull", "--json", name)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    fetched = {e["item"] for e in events if e["phase"] == "fetch" and e.get("status") == "done"}
    assert {lyr.digest for lyr in image.layers} <= fetched
    assert any(e["phase"] == "unpack" for e in events)
    listed = lamina(tmp_root, "image", "ls", "--names")
    assert name in listed.stdout
    missing = lamina(tmp_root, "image", "pull", f"{peer.host}/test/nothing:1")
    assert missing.returncode == NotFound.exit_code
    assert missing.stderr.startswith("lamina: NotFound: ") and "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1


class _closing:
    def __init__(self, root: Root) -> None:
        self.root = root

    def __enter__(self) -> Root:
        return self.root

    def __exit__(self, *exc: object) -> None:
        self.root.close()


def test_pulled_image_survives_gc(require_root: None, peer: Peer, image: imagefactory.ImageRef,
                                  tmp_root: Path) -> None:
    """The pull's labels make everything it brought reachable from the image: a garbage
    collection right after takes nothing of it, and the root checks clean."""
    from lamina.metadata.check import check
    from lamina.metadata.gc import collect

    name = f"{peer.host}/test/gc:1"
    skopeo_push(image.oci_ref, name)
    with Registry() as reg, _closing(Root(tmp_root)) as r:
        result = pull(reg, name, root=r)
        collect(r)
        content = r.content()
        for digest in [image.manifest_digest, image.config_digest,
                       *(lyr.digest for lyr in image.layers)]:
            content.info(digest)
        assert result.unpacked is not None
        r.snapshotter("overlay").stat(result.unpacked.chain_id)
        assert check(r).ok
