"""``lamina image push`` and ``tag``: what skopeo and lamina then read back."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
from registry_peer import Registry as Peer
from registry_peer import http_get, running_registry, skopeo_push

from lamina.images.names import tag
from lamina.images.pull import pull
from lamina.images.push import push
from lamina.images.service import ImageService
from lamina.metadata.images import ImageStore
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
              imagefactory.layer_from_entries(
                  [imagefactory.File("big", imagefactory._pseudo_random(3 << 20))],
                  work / "blobs", compression="none"),
              *imagefactory.rich_layers(work / "blobs", compression="zstd")]
    return imagefactory.build_oci_layout(work / "oci", layers, ref_name="push")


def _skopeo_inspect(ref: str) -> dict[str, object]:
    proc = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{ref}"], capture_output=True, text=True, timeout=60,
                          check=True)
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def test_push_import_pull_back(require_root: None, peer: Peer, image: imagefactory.ImageRef,
                               tmp_root: Path) -> None:
    root = Root(tmp_root / "a")
    svc = ImageService(root)
    try:
        svc.import_(image.layout, unpack=False)
    finally:
        svc.close()
    name = f"{peer.host}/pushed/app:v1"
    local = tag(root, "push", name)
    assert local.name == name
    with Registry() as reg:
        first = push(reg, name, root=root)
        assert first.uploaded == len(image.layers) + 1 and first.existing == 0
        again = push(reg, name, root=root)
        assert again.uploaded == 0 and again.existing == len(image.layers) + 1
        # the pushed blobs now name their repository: another one of the registry mounts
        mounted = push(reg, name, f"{peer.host}/second/app:v1", root=root)
        assert mounted.mounted == len(image.layers) + 1 and mounted.uploaded == 0
        # chunked uploads, from a root that knows no source
        fresh = Root(tmp_root / "c")
        svc = ImageService(fresh)
        svc.import_(image.layout, unpack=False)
        svc.close()
        chunked = push(reg, "push", f"{peer.host}/chunked/app:v1", root=fresh,
                       chunk_size=1 << 20)
        assert chunked.uploaded == len(image.layers) + 1
        fresh.close()
    manifest = _skopeo_inspect(name)
    assert [lyr["digest"] for lyr in manifest["layers"]] == [  # type: ignore[index, union-attr]
        lyr.digest for lyr in image.layers]
    status, body = http_get(peer.host, f"/v2/chunked/app/manifests/{image.manifest_digest}")
    assert status == 200 and json.loads(body)["config"]["digest"] == image.config_digest
    # pulled back by another root: same digest, same unpacked tree as the source
    other = Root(tmp_root / "b")
    with Registry() as reg:
        result = pull(reg, f"{peer.host}/chunked/app:v1", root=other)
    assert result.image.target.digest == image.manifest_digest
    root.close()
    other.close()


def test_cross_repository_mount(require_root: None, peer: Peer,
                                image: imagefactory.ImageRef, tmp_root: Path) -> None:
    """A pulled image pushed to another repository of its registry moves no layer bytes."""
    src = f"{peer.host}/origin/app:1"
    skopeo_push(image.oci_ref, src)
    root = Root(tmp_root)
    with Registry() as reg:
        pull(reg, src, root=root, unpack=False)
        result = push(reg, src, f"{peer.host}/copy/app:1", root=root)
    assert result.mounted == len(image.layers) + 1 and result.uploaded == 0
    assert _skopeo_inspect(f"{peer.host}/copy/app:1")["config"]["digest"] == \
        image.config_digest  # type: ignore[index]
    root.close()


def test_cli(require_root: None, peer: Peer, image: imagefactory.ImageRef,
             tmp_root: Path) -> None:
    def lamina(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lamina", "--root", str(tmp_root), *args],
                              capture_output=True, text=True, timeout=120, check=False)

    assert lamina("image", "import", "--no-unpack", str(image.layout)).returncode == 0
    out = lamina("image", "tag", "push", f"{peer.host}/cli/app:2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{peer.host}/cli/app:2\t{image.manifest_digest}")
    out = lamina("image", "push", f"{peer.host}/cli/app:2")
    assert out.returncode == 0, out.stderr
    assert "uploaded" in out.stdout
    missing = lamina("image", "push", "nothing:here")
    assert missing.returncode == 3 and missing.stderr.startswith("lamina: NotFound: ")
    images = ImageStore(tmp_root / "metadata.db")
    assert images.get("push").target.digest == image.manifest_digest
    images.close()
