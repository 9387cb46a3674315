"""Import and pull write fewer metadata transactions (each one fsyncs SQLite's WAL):
an import leases every blob its archive names in one transaction, a held blob is
not recorded again, and a pulled blob is committed with its source label.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import imagefactory as f
import pytest
from registry_peer import Registry as Peer
from registry_peer import running_registry, skopeo_push

from lamina.content import ContentStore
from lamina.content.local import LocalContentStore
from lamina.images.pull import pull
from lamina.images.service import ImageService
from lamina.labels import DISTRIBUTION_SOURCE
from lamina.metadata.leases import LeasedContent, LeaseManager
from lamina.metadata.root import Root
from lamina.remotes.registry import Registry


@pytest.fixture
def image(tmp_root: Path) -> f.ImageRef:
    w = tmp_root / "w"
    layers = [f.layer_from_entries([f.File(f"f{i}", b"x" * i)], w / f"l{i}") for i in range(3)]
    return f.build_oci_layout(w / "layout", layers, ref_name="tx:1")


def _resource_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    calls: list[tuple[str, list[str]]] = []
    real = LeaseManager.add_resources

    def counted(self: LeaseManager, lease_id: str, kind: str, idents: Iterable[str]) -> None:
        idents = list(idents)
        calls.append((kind, idents))
        real(self, lease_id, kind, idents)

    monkeypatch.setattr(LeaseManager, "add_resources", counted)
    return calls


@pytest.mark.parametrize("form", ["tar", "dir"])
def test_an_import_leases_its_blobs_in_one_transaction(
        form: str, image: f.ImageRef, tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = (f.as_tar(image.layout, tmp_root / "tx.tar") if form == "tar"
              else image.layout)
    calls = _resource_calls(monkeypatch)
    root = Root(tmp_root / "root")
    ImageService(root).import_(source, unpack=False)
    content = [idents for kind, idents in calls if kind == "content"]
    blobs = {f"sha256:{p.name}" for p in (image.layout / "blobs" / "sha256").iterdir()}
    assert len(content) == 1 and set(content[0]) == blobs, calls
    root.close()


def test_a_held_blob_is_not_recorded_again(tmp_root: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root = Root(tmp_root / "root")
    leases = root.leases()
    calls = _resource_calls(monkeypatch)
    digests = ["sha256:" + c * 64 for c in "12"]
    with leases.held() as lease:
        content = LeasedContent(root.content(), leases, lease.id)
        content.hold(digests)
        content.hold(digests)
        for d in [*digests, "sha256:" + "3" * 64]:
            with pytest.raises(Exception, match="not found"):
                content.info(d)
        assert calls == [("content", digests), ("content", ["sha256:" + "3" * 64])]
        assert sorted(i for _, i in leases.resources(lease.id)) == [*digests,
                                                                   "sha256:" + "3" * 64]
    root.close()


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def test_pulled_layers_are_committed_with_their_source_label(
        require_root: None, peer: Peer, image: f.ImageRef, tmp_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"{peer.host}/test/tx:1"
    skopeo_push(image.oci_ref, name)
    updated: list[str] = []
    real = LocalContentStore.update

    def update(self: ContentStore, info: object, *paths: str) -> object:
        updated.append(getattr(info, "digest", ""))
        return real(self, info, *paths)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalContentStore, "update", update)
    root = Root(tmp_root / "root")
    with Registry() as reg:
        pull(reg, name, root=root, unpack=False)
    layers = {lyr.digest for lyr in image.layers}
    assert layers.isdisjoint(updated), updated
    for digest in layers:
        assert root.content().info(digest).labels[DISTRIBUTION_SOURCE + peer.host] == "test/tx"
    root.close()
