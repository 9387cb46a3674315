"""Synchronous deletes (lamina.metadata.deletes): with ``sync`` the delete collects
what it released before returning; without, the garbage waits for ``lamina gc``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user

from lamina.images.service import ImageService
from lamina.metadata.deletes import delete_image, delete_lease
from lamina.metadata.gc import collect
from lamina.metadata.root import Root


@pytest.fixture
def root(tmp_path: Path) -> Root:
    require_root_user()
    layout = f.build_oci_layout(tmp_path / "layout", [f.minimal_layer(tmp_path)],
                                ref_name="a:1")
    r = Root(tmp_path / "root")
    svc = ImageService(r, snapshotter="native")
    svc.import_(f.as_tar(tmp_path / "layout", tmp_path / "a.tar"))
    svc.close()
    assert layout.manifest_digest in _blobs(r)
    return r


def _blobs(root: Root) -> set[str]:
    return {i.digest for i in root.content().walk()}


@pytest.mark.parametrize("sync", [False, True])
def test_an_image_deleted_with_sync_is_collected_at_once(root: Root, sync: bool) -> None:
    delete_image(root, "a:1", sync=sync)
    assert root.images().list() == []
    assert bool(_blobs(root)) is not sync
    assert collect(root).content == [] if sync else collect(root).content
    root.close()


@pytest.mark.parametrize("sync", [False, True])
def test_a_lease_deleted_with_sync_lets_go_of_what_it_kept(root: Root, sync: bool) -> None:
    leases = root.leases()
    lease = leases.create("keep", expire=timedelta(hours=1))
    for digest in _blobs(root):
        leases.add_resource(lease.id, "content", digest)
    delete_image(root, "a:1", sync=True)  # the lease alone keeps the blobs now
    assert _blobs(root)
    delete_lease(root, lease.id, sync=sync)
    assert bool(_blobs(root)) is not sync
    root.close()


@pytest.mark.parametrize("sync", [False, True])
def test_a_container_removed_with_sync_is_collected_at_once(root: Root, sync: bool) -> None:
    from lamina.containers.service import ContainerService

    containers = ContainerService(root, snapshotter="native")
    try:
        containers.create("a:1", "app")
        delete_image(root, "a:1")  # the container alone keeps the image's layers now
        assert _blobs(root)
        containers.remove("app", sync=sync)
    finally:
        containers.close()
    assert bool(_blobs(root)) is not sync
    root.close()
