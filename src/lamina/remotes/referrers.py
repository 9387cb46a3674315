"""OCI 1.1 referrers: manifests whose ``subject`` names another manifest.

Listing asks the referrers API, ``GET /v2/<name>/referrers/<digest>``
(optionally ``?artifactType=``). A registry without it (Debian's registry
2.8) answers 404; then the *referrers tag schema* is read instead: the image
index tagged ``<algorithm>-<hex>`` (``sha256-abcd…``), which clients that
push referrers maintain. Neither answering means there are none.

Pushing a manifest with a ``subject`` (see :mod:`.push`) to a registry
whose answer lacks the ``OCI-Subject`` header updates that tag: the index is
read (or started empty), a descriptor of the pushed manifest added once,
with its ``artifactType`` (the manifest's, else its config's media type) and
its annotations, and the index pushed back under the tag.
"""

from __future__ import annotations

import json
from typing import Any

from lamina.errors import FailedPrecondition, InvalidArgument, Unavailable
from lamina.oci.limits import MAX_DOCUMENT
from lamina.oci.types import MediaType, parse_json
from lamina.remotes.hosts import Endpoint
from lamina.remotes.resolver import ACCEPT_MANIFESTS
from lamina.remotes.session import Session
from lamina.util import jsondoc

__all__ = ["descriptor_for", "list_referrers", "referrers_tag", "subject_of",
           "update_referrers_tag"]


def referrers_tag(digest: str) -> str:
    """The tag of ``digest``'s referrers index (``sha256:ab…`` → ``sha256-ab…``)."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm[:32]}-{encoded[:64]}"


def subject_of(manifest: bytes) -> str:
    """The digest a manifest's ``subject`` names, or ""."""
    try:
        doc = jsondoc.loads(manifest, "manifest")
    except InvalidArgument:
        return ""
    subject = doc.get("subject") if isinstance(doc, dict) else None
    return str(subject.get("digest", "")) if isinstance(subject, dict) else ""


def descriptor_for(manifest: bytes, media_type: str, digest: str) -> dict[str, Any]:
    """The descriptor of ``manifest`` as a referrers index lists it."""
    doc = parse_json(manifest, "manifest")
    config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(manifest)}
    artifact_type = doc.get("artifactType") or (config or {}).get("mediaType")
    if artifact_type:
        desc["artifactType"] = artifact_type
    if isinstance(doc.get("annotations"), dict) and doc["annotations"]:
        desc["annotations"] = doc["annotations"]
    return desc


def _get_index(session: Session, ep: Endpoint, url: str) -> dict[str, Any] | None:
    resp = session.send(ep, "GET", url, scope=session.scope("pull"),
                        headers={"Accept": ACCEPT_MANIFESTS})
    if resp.status == 404:
        resp.close()
        return None
    if resp.status != 200:
        resp.close()
        raise Unavailable(f"{resp.host}: GET {url}: {resp.status} {resp.reason}")
    doc = parse_json(resp.read_all(MAX_DOCUMENT), "referrers index")
    if not isinstance(doc.get("manifests"), list):
        raise FailedPrecondition(f"{resp.host}: {url}: not an image index")
    return doc


def list_referrers(session: Session, digest: str, *,
                   artifact_type: str = "") -> tuple[list[dict[str, Any]], str]:
    """The referrers of ``digest`` and where they came from ("api" or "tag" or "")."""
    ep = next(session.endpoints_for("pull"))
    query = [("artifactType", artifact_type)] if artifact_type else []
    api = _get_index(session, ep, ep.url(f"/{session.path}/referrers/{digest}", query))
    source = "api"
    if api is None:
        api = _get_index(session, ep, ep.url(
            f"/{session.path}/manifests/{referrers_tag(digest)}"))
        source = "tag" if api is not None else ""
    found = [m for m in (api or {}).get("manifests", []) if isinstance(m, dict)]
    if artifact_type:  # a registry may not filter (and the tag never does)
        found = [m for m in found if m.get("artifactType") == artifact_type]
    return found, source


def update_referrers_tag(session: Session, ep: Endpoint, subject: str,
                         desc: dict[str, Any]) -> None:
    """Add ``desc`` to ``subject``'s referrers tag index (see the module docs)."""
    tag = referrers_tag(subject)
    url = ep.url(f"/{session.path}/manifests/{tag}")
    index = _get_index(session, ep, url) or {
        "schemaVersion": 2, "mediaType": MediaType.OCI_INDEX, "manifests": []}
    if any(isinstance(m, dict) and m.get("digest") == desc["digest"]
           for m in index["manifests"]):
        return
    index["manifests"].append(desc)
    data = json.dumps(index, separators=(",", ":")).encode()
    resp = session.send(ep, "PUT", url, scope=session.scope("pull,push"),
                        headers={"Content-Type": MediaType.OCI_INDEX,
                                 "Content-Length": str(len(data))}, body=data)
    resp.close()
    if resp.status not in (200, 201, 202):
        raise FailedPrecondition(f"{resp.host}: updating referrers tag {tag}: "
                                 f"{resp.status} {resp.reason}")
