"""From a reference to a descriptor, and the small documents behind descriptors.

Resolving asks the endpoints that may ``resolve`` for
``/v2/<name>/manifests/<tag or digest>``, with ``HEAD`` first (the digest,
type and size come from ``Docker-Content-Digest``, ``Content-Type`` and
``Content-Length``) and ``GET`` when ``HEAD`` is not enough. The ``Accept``
header names OCI and Docker schema 2 manifests and indexes. Documents
(manifests, indexes, configs) are read whole, but never more than
:data:`lamina.oci.limits.MAX_DOCUMENT` bytes (containerd's limit, and the
bound of every walk over an image's documents), and are checked against
their digest before anyone parses them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from lamina.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedErr,
    Unavailable,
)
from lamina.oci.limits import MAX_DOCUMENT
from lamina.oci.reference import Reference
from lamina.oci.types import INDEX_TYPES, MANIFEST_TYPES, Descriptor, MediaType, parse_json
from lamina.remotes.session import Session
from lamina.remotes.transport import Response

__all__ = ["ACCEPT_MANIFESTS", "Resolved", "fetch_document", "resolve"]

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
ACCEPT_MANIFESTS = ", ".join([
    MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST,
    MediaType.OCI_INDEX, MediaType.DOCKER_MANIFEST_LIST, "*/*",
])


@dataclass(frozen=True)
class Resolved:
    desc: Descriptor
    data: bytes | None = None  # the document, when resolving had to GET it


def _media_type(resp: Response) -> str:
    return resp.header("Content-Type").split(";", 1)[0].strip()


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _check(data: bytes, desc: Descriptor, host: str) -> None:
    if len(data) != desc.size or _sha256(data) != desc.digest:
        raise FailedPrecondition(
            f"{host}: {desc.digest}: the registry sent {len(data)} bytes hashing to "
            f"{_sha256(data)}, not the {desc.size} bytes the descriptor names")


_SCHEMA1_TYPES = frozenset({"application/vnd.docker.distribution.manifest.v1+json",
                            "application/vnd.docker.distribution.manifest.v1+prettyjws"})


def _document_type(data: bytes, header_type: str) -> str:
    doc = parse_json(data, "manifest")
    declared = str(doc.get("mediaType") or "")
    if declared in MANIFEST_TYPES | INDEX_TYPES:
        return declared
    if header_type in MANIFEST_TYPES | INDEX_TYPES:
        return header_type
    if header_type in _SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
        raise NotImplementedErr(
            f"Docker schema 1 manifests are not supported (media type {header_type!r}); "
            "push the image again with a current client, which writes schema 2 or OCI")
    if "manifests" in doc:
        return MediaType.OCI_INDEX
    if "config" in doc:
        return MediaType.OCI_MANIFEST
    raise InvalidArgument(f"not a manifest or index (media type {header_type!r})")


def _ok(resp: Response, *, not_found: str, failed: str) -> Response:
    """``resp`` when it is a 200; else closed, and NotFound (``not_found``) for a 404 or
    Unavailable (``failed``, then the status) for anything else. ``{host}`` in either
    names the host that answered."""
    if resp.status == 200:
        return resp
    resp.close()
    if resp.status == 404:
        raise NotFound(not_found.replace("{host}", resp.host))
    where = failed.replace("{host}", resp.host)
    raise Unavailable(f"{where}: {resp.status} {resp.reason}")


def resolve(session: Session, ref: Reference) -> Resolved:
    """The descriptor ``ref`` names on the registry (NotFound when none has it)."""
    suffix = f"/{session.path}/manifests/{ref.object}"
    scope = session.scope("pull")
    headers = {"Accept": ACCEPT_MANIFESTS}
    ep, resp = session.request("resolve", "HEAD", suffix, scope=scope, headers=headers)
    if resp.status == 404:
        resp.close()
        raise NotFound(f"{ref}: not found on {resp.host}")
    if resp.status == 200:
        digest = ref.digest or resp.header("Docker-Content-Digest").strip()
        size = resp.content_length
        media_type = _media_type(resp)
        resp.close()
        # a header that is not a sha256 digest or a size is no answer: GET decides
        if _SHA256.fullmatch(digest) and size is not None and \
                media_type in MANIFEST_TYPES | INDEX_TYPES:
            if size > MAX_DOCUMENT:
                raise InvalidArgument(f"{ref}: manifest of {size} bytes is larger than the "
                                      f"{MAX_DOCUMENT} allowed")
            return Resolved(Descriptor(media_type, digest, size))
    else:
        resp.close()
        if resp.status not in (405, 400):
            raise Unavailable(f"{resp.host}: HEAD {suffix}: {resp.status} {resp.reason}")
    resp = _ok(session.send(ep, "GET", ep.url(suffix), scope=scope, headers=headers),
               not_found=f"{ref}: not found on {{host}}", failed=f"{{host}}: GET {suffix}")
    header_type = _media_type(resp)
    data = resp.read_all(MAX_DOCUMENT)
    digest = _sha256(data)
    if ref.digest and digest != ref.digest:
        raise FailedPrecondition(f"{resp.host}: {ref}: the registry sent a manifest hashing "
                                 f"to {digest}")
    return Resolved(Descriptor(_document_type(data, header_type), digest, len(data)), data)


def fetch_document(session: Session, desc: Descriptor) -> bytes:
    """The bytes of a manifest, index or config, verified against ``desc``."""
    if desc.size > MAX_DOCUMENT:
        raise InvalidArgument(f"{desc.digest}: a document of {desc.size} bytes is larger "
                              f"than the {MAX_DOCUMENT} allowed")
    is_manifest = desc.media_type in MANIFEST_TYPES | INDEX_TYPES
    kind = "manifests" if is_manifest else "blobs"
    headers = {"Accept": ACCEPT_MANIFESTS} if is_manifest else {}
    _, resp = session.request("pull", "GET", f"/{session.path}/{kind}/{desc.digest}",
                              scope=session.scope("pull"), headers=headers)
    resp = _ok(resp, not_found=f"{{host}}: {session.path}: {desc.digest} not found",
               failed=f"{{host}}: {desc.digest}")
    length = resp.content_length
    if length is not None and length != desc.size:
        resp.close()
        raise FailedPrecondition(f"{resp.host}: {desc.digest}: the registry sends {length} "
                                 f"bytes for a document of {desc.size}")
    data = resp.read_all(desc.size)
    _check(data, desc, resp.host)
    return data
