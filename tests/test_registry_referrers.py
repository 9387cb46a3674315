"""OCI referrers: artifacts pushed with a ``subject`` are listed, through the tag schema on
Debian's registry 2.8 (no referrers API) and through the API where a registry has it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
from bad_registry import State, serving
from registry_peer import Registry as Peer
from registry_peer import http_get, running_registry

from lamina.images.graph import label_references, put_document
from lamina.images.push import push
from lamina.images.service import ImageService
from lamina.metadata.images import Image, ImageStore
from lamina.metadata.root import Root
from lamina.oci.reference import parse_reference
from lamina.oci.types import Descriptor, MediaType
from lamina.remotes.referrers import list_referrers, referrers_tag
from lamina.remotes.registry import Registry

EMPTY = "application/vnd.oci.empty.v1+json"


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def _artifact(root: Root, name: str, subject: Descriptor, artifact_type: str,
              payload: bytes) -> Image:
    content = root.content()
    config = put_document(content, b"{}")
    layer = put_document(content, payload)
    manifest = {
        "schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY, "digest": config, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": layer,
                    "size": len(payload)}],
        "subject": subject.to_json(),
        "annotations": {"org.opencontainers.image.created": "2024-01-02T03:04:05Z"},
    }
    data = json.dumps(manifest).encode()
    desc = Descriptor(MediaType.OCI_MANIFEST, put_document(content, data), len(data))
    label_references(content, desc)
    images = ImageStore(root.metadata_path)
    try:
        return images.put(Image(name=name, target=desc))
    finally:
        images.close()


def test_referrers_tag_schema(require_root: None, peer: Peer, tmp_root: Path) -> None:
    work = tmp_root / "image"
    layer = imagefactory.layer_from_entries([imagefactory.File("x", b"x")], work / "blobs")
    image = imagefactory.build_oci_layout(work / "oci", [layer], ref_name="base")
    root = Root(tmp_root / "root")
    svc = ImageService(root)
    svc.import_(work / "oci", unpack=False)
    svc.close()
    name = f"{peer.host}/with/refs:1"
    subject = Descriptor(MediaType.OCI_MANIFEST, image.manifest_digest, image.manifest_size)
    sbom = _artifact(root, "sbom", subject, "application/vnd.lamina.test.sbom", b"sbom\n")
    sig = _artifact(root, "sig", subject, "application/vnd.lamina.test.sig", b"sig\n")
    with Registry() as reg:
        # the image's local artifacts travel with it (or not, when asked)
        alone = push(reg, "base", f"{peer.host}/alone/app:1", root=root, referrers=False)
        assert alone.referrers == 0
        assert list_referrers(reg.session(parse_reference(f"{peer.host}/alone/app:1")),
                              image.manifest_digest) == ([], "")
        assert push(reg, "base", name, root=root).referrers == 2
        for art in (sbom, sig, sbom):  # pushed again by name: listed once
            push(reg, art.name, f"{peer.host}/with/refs@{art.target.digest}", root=root)
        session = reg.session(parse_reference(name))
        found, source = list_referrers(session, image.manifest_digest)
        assert source == "tag"
        assert [(m["digest"], m["artifactType"]) for m in found] == [
            (sbom.target.digest, "application/vnd.lamina.test.sbom"),
            (sig.target.digest, "application/vnd.lamina.test.sig")]
        assert found[0]["annotations"] == {"org.opencontainers.image.created":
                                           "2024-01-02T03:04:05Z"}
        only, _ = list_referrers(session, image.manifest_digest,
                                 artifact_type="application/vnd.lamina.test.sig")
        assert [m["digest"] for m in only] == [sig.target.digest]
        none, source = list_referrers(session, sbom.target.digest)
        assert (none, source) == ([], "")
    # the artifact keeps its subject on the registry, byte for byte
    status, body = http_get(peer.host, f"/v2/with/refs/manifests/{sbom.target.digest}")
    assert status == 200 and json.loads(body)["subject"]["digest"] == image.manifest_digest
    status, _ = http_get(peer.host, f"/v2/with/refs/manifests/"
                                    f"{referrers_tag(image.manifest_digest)}",
                         accept=MediaType.OCI_INDEX)
    assert status == 200
    out = subprocess.run([sys.executable, "-m", "lamina", "--root", str(tmp_root / "cli"),
                          "image", "referrers", "--json", name], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert listed["subject"] == image.manifest_digest and len(listed["referrers"]) == 2
    root.close()


def test_referrers_api(require_root: None) -> None:
    """A registry with the API is asked first; its answer is used as it is."""
    state = State()
    subject = "sha256:" + "a" * 64
    answer = {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX, "manifests": [
        {"mediaType": MediaType.OCI_MANIFEST, "digest": "sha256:" + "b" * 64, "size": 10,
         "artifactType": "application/vnd.example"}]}
    state.hooks[f"/v2/x/y/referrers/{subject}"] = lambda h: (h.send(
        200, json.dumps(answer).encode(), {"Content-Type": MediaType.OCI_INDEX}), True)[1]
    with serving(state) as host, Registry() as reg:
        found, source = list_referrers(reg.session(parse_reference(f"{host}/x/y:1")), subject)
    assert source == "api" and found == answer["manifests"]
    assert not state.requests("GET", f"/v2/x/y/manifests/{referrers_tag(subject)}")
