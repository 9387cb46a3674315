"""containerd 1.6 as the peer: ``ctr image pull --plain-http`` of what skopeo pushed gives
the tree lamina's pull gives, and containerd pulls what lamina pushed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
import treesum
from containerd_peer import private_containerd, require_containerd
from registry_peer import Registry as Peer
from registry_peer import running_registry, skopeo_push

from lamina.images.identity import chain_id
from lamina.images.service import ImageService
from lamina.remotes.pull import pull
from lamina.remotes.push import push
from lamina.remotes.registry import Registry
from lamina.root import Root


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def test_pull_matches_ctr_and_ctr_reads_push(require_root: None, peer: Peer,
                                             tmp_root: Path) -> None:
    require_containerd()
    work = tmp_root / "image"
    layers = [imagefactory.minimal_layer(work / "blobs"),
              *imagefactory.rich_layers(work / "blobs", compression="zstd")]
    image = imagefactory.build_oci_layout(work / "oci", layers, ref_name="ctr")
    name = f"{peer.host}/peer/app:1"
    skopeo_push(image.oci_ref, name)
    top = chain_id(image.diff_ids)

    root = Root(tmp_root / "lamina")
    with Registry() as reg:
        pull(reg, name, root=root)
        pushed = f"{peer.host}/from-lamina/app:1"
        push(reg, name, pushed, root=root)
    svc = ImageService(root)
    try:
        svc.mount(name, tmp_root / "mnt")
        try:
            mine = treesum.summarize(tmp_root / "mnt", dir_mtimes=False)
        finally:
            svc.unmount(tmp_root / "mnt")
    finally:
        svc.close()
        root.close()

    with private_containerd(tmp_root / "ctrd", gc_on_request=True) as ctrd:
        for ref, key in ((name, "theirs"), (pushed, "lamina-pushed")):
            ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "native", ref)
            ctrd.ctr("snapshots", "--snapshotter", "native", "view", key, top)
            words = ctrd.ctr("snapshots", "--snapshotter", "native", "mounts", "/x",
                             key).stdout.split()
            theirs = treesum.summarize(words[3], dir_mtimes=False)
            assert treesum.diff(theirs, mine) == [], ref
        listed = ctrd.ctr("images", "ls").stdout
        assert image.manifest_digest in listed
