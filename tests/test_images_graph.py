"""One walk over the descriptor graph (lamina.images.graph): the same bounds, the same
GC labels and the same order for every path, and the store's follow reader.

Each case here failed before the walks were one: push allowed a nesting level pull
refused, export and import labels had no bound at all, import labelled a repeated
child once per entry, and documents were capped at 16 MiB on import but 4 MiB on pull.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lamina.content import sha256_digest, write_blob
from lamina.content.local import LocalContentStore
from lamina.errors import InvalidArgument, NotFound, ResourceExhausted
from lamina.images import graph
from lamina.images.graph import put_document
from lamina.oci.limits import MAX_DEPTH, MAX_DOCUMENT, Limits
from lamina.oci.types import Descriptor, MediaType

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalContentStore]:
    s = LocalContentStore(tmp_path / "content")
    yield s
    s.close()


def _doc(store: LocalContentStore, media_type: str, doc: dict[str, object]) -> Descriptor:
    data = json.dumps(doc).encode()
    return Descriptor(media_type, put_document(store, data), len(data))


def _manifest(store: LocalContentStore, tag: str) -> Descriptor:
    config = put_document(store, json.dumps({"tag": tag}).encode())
    layer = write_blob(store, f"layer-{tag}", tag.encode())
    return _doc(store, MediaType.OCI_MANIFEST, {
        "schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
        "config": {"mediaType": MediaType.OCI_CONFIG, "digest": config,
                   "size": len(json.dumps({"tag": tag}))},
        "layers": [{"mediaType": LAYER, "digest": layer, "size": len(tag)}]})


def _index(store: LocalContentStore, children: Sequence[Descriptor]) -> Descriptor:
    return _doc(store, MediaType.OCI_INDEX, {
        "schemaVersion": 2, "mediaType": MediaType.OCI_INDEX,
        "manifests": [c.to_json() for c in children]})


def test_children_first_with_a_shared_child(store: LocalContentStore) -> None:
    """``after`` sees every descriptor after all it reaches, also a child that a later
    index repeats (a push puts each manifest only once its children are there)."""
    shared = _manifest(store, "shared")
    first = _index(store, [shared])
    second = _index(store, [_manifest(store, "own"), shared])
    top = _index(store, [first, second])
    order: list[str] = []
    graph.walk(top, graph.stored(store), where="top", after=lambda d: order.append(d.digest))
    for parent in (first, second, top):
        for child in graph.children(parent, graph.read_document(store, parent)):
            assert order.index(child.digest) < order.index(parent.digest)
    assert len(order) == len(set(order))


def test_every_walk_bounds_depth_alike(store: LocalContentStore) -> None:
    desc = _manifest(store, "deep")
    for _ in range(MAX_DEPTH):
        desc = _index(store, [desc])
    with pytest.raises(InvalidArgument, match=f"nest more than {MAX_DEPTH} deep"):
        list(graph.walk_descriptors(store, desc))
    with pytest.raises(InvalidArgument, match=f"nest more than {MAX_DEPTH} deep"):
        graph.label_references(store, desc)
    nested = graph.children(desc, graph.read_document(store, desc))[0]  # one level less
    assert len(list(graph.walk_descriptors(store, nested))) == MAX_DEPTH + 2


def test_budget_is_spent_before_children_are_read(store: LocalContentStore) -> None:
    children = [_manifest(store, str(i)) for i in range(4)]
    top = _index(store, children)
    visited: list[str] = []
    read = graph.stored(store)

    def handler(desc: Descriptor) -> Sequence[Descriptor]:
        visited.append(desc.digest)
        return read(desc)

    with pytest.raises(ResourceExhausted, match="more than 3 descriptors"):
        graph.walk(top, handler, where="top", limits=Limits(descriptors=3))
    assert visited == [top.digest]
    with pytest.raises(ResourceExhausted, match="more than 100 bytes"):
        graph.walk(top, handler, where="top", limits=Limits(document_bytes=100))


def test_gc_labels_name_each_child_once(store: LocalContentStore) -> None:
    image = _manifest(store, "x")
    top = _index(store, [image, image, image])
    graph.label_references(store, top)
    refs = {k: v for k, v in store.info(top.digest).labels.items()
            if k.startswith("containerd.io/gc.ref.")}
    assert refs == {"containerd.io/gc.ref.content.m.0": image.digest}
    labels = store.info(image.digest).labels
    assert labels["containerd.io/gc.ref.content.config"] != labels[
        "containerd.io/gc.ref.content.l.0"]


def test_one_document_bound(store: LocalContentStore) -> None:
    big = b"{" + b" " * MAX_DOCUMENT + b"}"
    desc = Descriptor(MediaType.OCI_MANIFEST, sha256_digest(big), len(big))
    with pytest.raises(InvalidArgument, match=f"larger than the {MAX_DOCUMENT} allowed"):
        graph.read_document(store, desc)
    assert MAX_DOCUMENT == 4 << 20


def test_follow_reads_a_growing_ingest(store: LocalContentStore) -> None:
    with pytest.raises(NotFound):
        store.follow("none")
    w = store.writer("grow", total=6)
    w.write(b"abc")
    with store.follow("grow") as f:
        assert f.read(10) == b"abc"
        assert f.read(10) == b""
        w.write(b"def")
        w.commit(6, sha256_digest(b"abcdef"))
        assert f.read(10) == b"def"  # the same file, now the committed blob
    w.close()



def test_any_manifest_falls_back_to_a_stored_other_platform(store: LocalContentStore) -> None:
    """image ls and inspect describe an image pulled for another platform: the host's
    manifest when the index has one, else the first other platform's that is stored."""
    config = json.dumps({"architecture": "arm", "os": "plan9",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    other = _doc(store, MediaType.OCI_MANIFEST, {
        "schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
        "config": {"mediaType": MediaType.OCI_CONFIG, "digest": put_document(store, config),
                   "size": len(config)},
        "layers": []})
    missing = Descriptor(MediaType.OCI_MANIFEST, "sha256:" + "0" * 64, 10,
                         platform={"os": "plan9", "architecture": "mips"})
    index = _index(store, [missing, Descriptor(other.media_type, other.digest, other.size,
                                               platform={"os": "plan9", "architecture": "arm"})])
    with pytest.raises(NotFound):
        graph.manifest_for(store, index)
    desc, _, found = graph.any_manifest(store, index)
    assert (desc.digest, found.raw["architecture"]) == (other.digest, "arm")
    with pytest.raises(NotFound):
        graph.any_manifest(store, _index(store, [missing]))
