"""``lamina --snapshotter erofs image pull`` from a loopback registry: each layer is
written as an EROFS image while it downloads, and the pulled image mounts with the
tree an overlay import of the same layout gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import imagefactory
import treesum
from registry_peer import Registry as Peer
from registry_peer import skopeo_push
from test_registry_pull import _imported_tree, image, peer

from lamina.images.service import ImageService
from lamina.metadata.root import Root
from lamina.mounts.mount import unmount_all

__all__ = ["image", "peer"]  # the fixtures, shared with test_registry_pull


def test_pull_onto_erofs_equals_import(require_root: None, peer: Peer,
                                       image: imagefactory.ImageRef, tmp_root: Path) -> None:
    name = f"{peer.host}/test/rich-erofs:1"
    skopeo_push(image.oci_ref, name)
    root = tmp_root / "pulled"
    proc = subprocess.run([sys.executable, "-m", "lamina", "--root", str(root),
                           "--snapshotter", "erofs", "image", "pull", name],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    images = sorted((root / "snapshots/erofs/snapshots").glob("*/layer.erofs"))
    assert len(images) == len(image.layers), images
    svc = ImageService(Root(root), snapshotter="erofs")
    mnt = tmp_root / "mnt"
    try:
        svc.mount(name, mnt)
        try:
            pulled = treesum.summarize(mnt, dir_mtimes=False)
        finally:
            svc.unmount(mnt)
    finally:
        svc.close()
        svc.root.close()
        unmount_all(mnt)
    assert treesum.diff(_imported_tree(image.layout, tmp_root), pulled) == []
