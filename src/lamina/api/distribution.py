"""What a read-only OCI distribution endpoint answers, request by request.

:func:`answer` turns a request (method, target, ``Range``) into an
:class:`Answer`: a status, headers and a body that is either bytes or a
span of an open blob. It knows no sockets; :mod:`lamina.api.mirror` serves
it. The routes:

==========================================  ==========================================
``GET|HEAD /v2/``                           200 ``{}``
``GET|HEAD /v2/<name>/blobs/<digest>``      the committed blob (``application/octet-stream``)
``GET|HEAD /v2/<name>/manifests/<digest>``  the blob, when it is a manifest or an index,
                                            typed by its ``mediaType`` (else by its shape)
``/v2/<name>/manifests/<tag>``              404 ``MANIFEST_UNKNOWN``: by digest only
``/v2/_catalog``, ``.../tags/list``, other  404 ``UNSUPPORTED``: nothing is listed
any other method                            405 ``UNSUPPORTED`` (``Allow: GET, HEAD``)
==========================================  ==========================================

A blob is looked up by digest alone: ``<name>`` must fit the distribution
grammar but does not select anything (the digest is the address, and the
puller verifies it). Errors carry the distribution error document
(``{"errors": [{"code": ..., "message": ...}]}``); a 404 is what makes
containerd and lamina try the next host of their ``hosts.toml``. A single
``Range`` (``bytes=a-b``, ``a-``, ``-n``) is answered with 206, one that
cannot be satisfied with 416; several ranges or a malformed one get the
whole blob, as HTTP allows.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from lamina.errors import NotFound
from lamina.oci.types import INDEX_TYPES, MANIFEST_TYPES, MediaType

__all__ = [
    "API_VERSION",
    "MAX_MANIFEST",
    "Answer",
    "BlobOpener",
    "answer",
    "byte_range",
    "error_answer",
    "manifest_type",
]

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
MAX_MANIFEST = 4 << 20  # what containerd reads of a manifest, at most
MAX_NAME = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_ROUTE = re.compile(r"/v2/(?P<name>.+)/(?P<kind>blobs|manifests)/(?P<ref>[^/]+)")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_RANGE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})", re.ASCII)

#: Opens a committed blob by digest (NotFound when the store has none).
BlobOpener = Callable[[str], BinaryIO]


@dataclass
class Answer:
    """A response: ``body`` bytes, or ``length`` bytes of ``blob`` from ``offset``."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    blob: BinaryIO | None = None
    offset: int = 0
    length: int = 0
    close: bool = False
    """Close the connection after this answer (the request may have had a body)."""

    @property
    def content_length(self) -> int:
        return self.length if self.blob is not None else len(self.body)

    def release(self) -> None:
        if self.blob is not None:
            self.blob.close()
            self.blob = None


def error_answer(status: int, code: str, message: str, *, close: bool = False,
                 headers: list[tuple[str, str]] | None = None) -> Answer:
    """The distribution error document for ``code``."""
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return Answer(status, [("Content-Type", "application/json"), *(headers or [])],
                  body, close=close)


def manifest_type(data: bytes) -> str | None:
    """The media type of a manifest or index document; None for anything else."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    declared = doc.get("mediaType")
    if declared:
        return declared if declared in MANIFEST_TYPES | INDEX_TYPES else None
    if doc.get("schemaVersion") != 2:
        return None
    if isinstance(doc.get("manifests"), list):
        return MediaType.OCI_INDEX
    if isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list):
        return MediaType.OCI_MANIFEST
    return None


class Unsatisfiable(Exception):
    """A range that starts past the end of the blob."""


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(offset, length) of a single-range ``Range`` header; None means the whole blob.

    Raises :class:`Unsatisfiable` for a range that selects nothing."""
    m = _RANGE.fullmatch(header.strip())
    if m is None or not (m[1] or m[2]):
        return None
    if not m[1]:  # the last n bytes
        n = int(m[2])
        if n == 0 or size == 0:
            raise Unsatisfiable
        return size - min(n, size), min(n, size)
    start = int(m[1])
    if m[2] and int(m[2]) < start:
        return None  # malformed: ignored
    if start >= size:
        raise Unsatisfiable
    end = min(int(m[2]) if m[2] else size - 1, size - 1)
    return start, end - start + 1


def _not_allowed(method: str) -> Answer:
    return error_answer(405, "UNSUPPORTED", f"{method}: this mirror is read-only",
                        close=True, headers=[("Allow", "GET, HEAD")])


def _unsupported(path: str) -> Answer:
    return error_answer(404, "UNSUPPORTED", f"{path}: not served (a mirror serves blobs "
                        "and manifests by digest, and lists nothing)")


def _path_of(target: str) -> str | None:
    """The decoded path of an origin-form request target; None when it is not one."""
    if not target.startswith("/"):
        return None
    path = urllib.parse.unquote(target.split("?", 1)[0])
    return path if path.isascii() and path.isprintable() else None


def _open_sized(open_blob: BlobOpener, digest: str) -> tuple[BinaryIO, int]:
    blob = open_blob(digest)
    return blob, os.fstat(blob.fileno()).st_size


def _manifest(open_blob: BlobOpener, digest: str) -> Answer:
    """The manifest ``digest`` as a bytes answer; NotFound unless it is one."""
    blob, size = _open_sized(open_blob, digest)
    with blob:
        data = blob.read(MAX_MANIFEST + 1) if size <= MAX_MANIFEST else b""
    media_type = manifest_type(data) if data else None
    if media_type is None:
        raise NotFound(f"{digest} is not a manifest")
    return Answer(200, [("Content-Type", media_type)], data)


def _ranged(ans: Answer, size: int, range_header: str) -> Answer:
    """Apply ``Range`` to a 200 answer of ``size`` bytes (bytes or blob)."""
    ans.headers.append(("Accept-Ranges", "bytes"))
    if not range_header:
        return ans
    try:
        span = byte_range(range_header, size)
    except Unsatisfiable:
        ans.release()
        return error_answer(416, "SIZE_INVALID", f"range {range_header!r} is past the "
                            f"end of {size} bytes", headers=[("Content-Range", f"bytes */{size}")])
    if span is None:
        return ans
    offset, length = span
    ans.status = 206
    ans.headers.append(("Content-Range", f"bytes {offset}-{offset + length - 1}/{size}"))
    if ans.blob is not None:
        ans.offset, ans.length = offset, length
    else:
        ans.body = ans.body[offset:offset + length]
    return ans


def answer(method: str, target: str, open_blob: BlobOpener, *,
           range_header: str = "") -> Answer:
    """The answer to ``method target`` (see the module docs). A HEAD gets the answer
    a GET would (the server sends no body); a blob answer must be released by the
    caller (:meth:`Answer.release`) once sent."""
    if method not in ("GET", "HEAD"):
        return _not_allowed(method)
    path = _path_of(target)
    if path is None:
        return error_answer(400, "UNSUPPORTED", "bad request target", close=True)
    if path in ("/v2", "/v2/"):
        return Answer(200, [("Content-Type", "application/json")], b"{}")
    route = _ROUTE.fullmatch(path)
    if route is None:
        return _unsupported(path)
    name, kind, ref = route["name"], route["kind"], route["ref"]
    if len(name) > MAX_NAME or _NAME.fullmatch(name) is None:
        return error_answer(400, "NAME_INVALID", f"invalid repository name {name!r}")
    if kind == "manifests" and ":" not in ref:
        return error_answer(404, "MANIFEST_UNKNOWN",
                            f"{name}:{ref}: this mirror serves manifests by digest only")
    if _DIGEST.fullmatch(ref) is None:
        return error_answer(400, "DIGEST_INVALID", f"invalid digest {ref!r}")
    unknown = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
    if _SHA256.fullmatch(ref) is None:
        return error_answer(404, unknown, f"{ref}: not in this store (sha256 only)")
    try:
        if kind == "manifests":
            ans = _manifest(open_blob, ref)
            size = len(ans.body)
        else:
            blob, size = _open_sized(open_blob, ref)
            ans = Answer(200, [("Content-Type", "application/octet-stream")], blob=blob,
                         length=size)
    except NotFound:
        return error_answer(404, unknown, f"{ref}: not in this store")
    ans.headers.append(("Docker-Content-Digest", ref))
    ans.headers.append(("Etag", f'"{ref}"'))
    return _ranged(ans, size, range_header)
