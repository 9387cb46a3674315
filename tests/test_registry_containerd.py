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

from lamina.images.pull import pull
from lamina.images.push import push
from lamina.images.service import ImageService
from lamina.metadata.root import Root
from lamina.oci.identity import chain_id
from lamina.remotes.registry import Registry


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


@pytest.mark.parametrize("content", [False, True], ids=["snapshotter", "snapshotter+content"])
def test_containerd_on_lamina_pulls(require_root: None, peer: Peer, tmp_root: Path,
                                    content: bool) -> None:
    """``ctr image pull --plain-http --snapshotter lamina`` with lamina as containerd's
    proxy snapshotter (and content store): the tree is lamina's own pull's."""
    from containerd_peer import lamina_and_containerd

    work = tmp_root / "image"
    # (not the rich layers: containerd 1.6 applies into a lone overlay upperdir, where a
    # hard link to a file of a lower layer cannot be made, whatever the snapshotter)
    f = imagefactory
    layers = [f.minimal_layer(work / "blobs"),
              f.layer_from_entries([f.Dir("etc/app"), f.File("etc/app/conf", b"a=1\n"),
                                    f.Symlink("etc/app/link", "conf")], work / "blobs"),
              f.layer_from_entries([f.Whiteout("etc/app/link"),
                                    f.File("etc/app/conf", b"a=2\n", mode=0o600)],
                                   work / "blobs", compression="zstd")]
    image = f.build_oci_layout(work / "oci", layers, ref_name="proxy")
    name = f"{peer.host}/proxy/app:1"
    skopeo_push(image.oci_ref, name)
    top = chain_id(image.diff_ids)

    root = Root(tmp_root / "own")
    with Registry() as reg:
        pull(reg, name, root=root)
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

    with lamina_and_containerd(tmp_root / "proxy", content=content,
                               gc_on_request=True) as (_lamina, ctrd):
        ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "lamina", name)
        ctrd.ctr("snapshots", "--snapshotter", "lamina", "view", "look", top)
        out = ctrd.ctr("snapshots", "--snapshotter", "lamina", "mounts", "/x", "look").stdout
        target = tmp_root / "ctr-mnt"
        target.mkdir()
        import subprocess

        cmd = out.strip().replace("/x", str(target))
        subprocess.run(cmd, shell=True, check=True, timeout=60)
        try:
            theirs = treesum.summarize(target, dir_mtimes=False)
        finally:
            subprocess.run(["umount", str(target)], check=True, timeout=60)
        ctrd.ctr("snapshots", "--snapshotter", "lamina", "rm", "look")
    assert treesum.diff(theirs, mine) == []
