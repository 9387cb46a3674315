"""Blobs and manifests to a registry (containerd's ``remotes.Pusher``).

For each blob (:meth:`Pusher.blob`):

1. ``HEAD /v2/<name>/blobs/<digest>``: 200 means the registry has it.
2. With ``mount_from`` (another repository of the same registry that has
   it), a cross-repository mount is asked for:
   ``POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<repo>`` (201: done,
   no bytes sent; 202: the registry declined and opened an upload instead).
3. Otherwise ``POST /v2/<name>/blobs/uploads/`` opens an upload, and the
   bytes go in one ``PUT <location>?digest=<digest>`` (monolithic), or, with
   ``chunk_size``, in ``PATCH`` requests carrying ``Content-Range`` followed
   by a closing ``PUT``.

The bytes come from a *source* the caller gives, ``source(offset, size)``,
opened again for every request that carries them: the session re-sends a
request that failed (a 5xx, a dropped connection), and a body can be sent
twice only when it can be read twice. (containerd's pusher hands out a
writer instead; a writer's bytes, once written, cannot be sent again.)

Manifests go with ``PUT /v2/<name>/manifests/<reference>`` and their own
media type as ``Content-Type`` (:meth:`Pusher.manifest`); one with a
``subject`` is also listed in the referrers tag index when the registry has
no referrers API (see :mod:`.referrers`).
"""

from __future__ import annotations

import functools
import urllib.parse
from collections.abc import Callable
from typing import IO, Literal

from lamina.errors import FailedPrecondition, Unavailable
from lamina.oci.types import Descriptor
from lamina.remotes.hosts import Endpoint
from lamina.remotes.referrers import descriptor_for, subject_of, update_referrers_tag
from lamina.remotes.session import Session
from lamina.remotes.transport import Response, printable
from lamina.util.progress import Progress

__all__ = ["Outcome", "Pusher", "Source"]

#: ``source(offset, size)``: the blob's bytes from ``offset``, ``size`` of them
#: (``-1``: to the end), in a file the pusher closes.
Source = Callable[[int, int], IO[bytes]]
#: What pushing a blob took.
Outcome = Literal["existing", "mounted", "uploaded"]


class Pusher:
    """Writes blobs and manifests to one repository (see the module docs)."""

    def __init__(self, session: Session, *, progress: Progress | None = None,
                 chunk_size: int = 0) -> None:
        self.session = session
        self.progress = progress or Progress()
        self.chunk_size = chunk_size
        self.ep: Endpoint = next(session.endpoints_for("push"))
        self.scope = session.scope("pull,push")

    def _url(self, location: str, extra: list[tuple[str, str]] | None = None) -> str:
        base = f"{self.ep.scheme}://{self.ep.host}/"
        url = urllib.parse.urljoin(base, location)
        if extra:
            parts = urllib.parse.urlsplit(url)
            query = urllib.parse.parse_qsl(parts.query) + extra
            url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        return url

    def _fail(self, what: str, resp: Response) -> FailedPrecondition:
        body = b""
        try:
            body = resp.read(2048)
        finally:
            resp.close()
        detail = printable(" ".join(body.decode(errors="replace").split()), 300)
        return FailedPrecondition(f"{resp.host}: {what}: {resp.status} {resp.reason} {detail}")

    def blob(self, desc: Descriptor, source: Source, *, mount_from: str = "") -> Outcome:
        """Push blob ``desc``, its bytes from ``source`` (module docs)."""
        prefix = f"/{self.session.path}/blobs/"
        resp = self.session.send(self.ep, "HEAD", self.ep.url(prefix + desc.digest),
                                 scope=self.scope)
        resp.close()
        if resp.status == 200:
            self.progress.event("push", desc.digest, done=desc.size, total=desc.size,
                                status="exists")
            return "existing"
        query: list[tuple[str, str]] = []
        scope = self.scope
        if mount_from and mount_from != self.session.path:
            query = [("mount", desc.digest), ("from", mount_from)]
            scope = f"{scope} repository:{mount_from}:pull"
        resp = self.session.send(self.ep, "POST", self.ep.url(f"{prefix}uploads/", query),
                                 scope=scope, headers={"Content-Length": "0"})
        if resp.status == 201 and query:
            resp.close()
            self.progress.event("push", desc.digest, done=desc.size, total=desc.size,
                                status="mounted")
            return "mounted"
        if resp.status != 202:
            raise self._fail(f"starting the upload of {desc.digest}", resp)
        location = resp.header("Location")
        resp.close()
        if not location:
            raise Unavailable(f"{resp.host}: upload of {desc.digest}: no Location")
        if self.chunk_size and desc.size > self.chunk_size:
            location = self._chunks(desc, source, location)
            body: bytes | Callable[[], IO[bytes]] | None = None
            length = 0
        else:
            body = functools.partial(source, 0, -1)  # opened again on every send
            length = desc.size
        resp = self.session.send(
            self.ep, "PUT", self._url(location, [("digest", desc.digest)]), scope=self.scope,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(length)},
            body=body)
        if resp.status not in (201, 204):
            raise self._fail(f"uploading {desc.digest}", resp)
        resp.close()
        self.progress.event("push", desc.digest, done=desc.size, total=desc.size,
                            status="done")
        return "uploaded"

    def _chunks(self, desc: Descriptor, source: Source, location: str) -> str:
        offset = 0
        while offset < desc.size:
            n = min(self.chunk_size, desc.size - offset)
            resp = self.session.send(
                self.ep, "PATCH", self._url(location), scope=self.scope,
                headers={"Content-Type": "application/octet-stream",
                         "Content-Range": f"{offset}-{offset + n - 1}",
                         "Content-Length": str(n)},
                body=functools.partial(source, offset, n))
            if resp.status != 202:
                raise self._fail(f"uploading {desc.digest} at {offset}", resp)
            location = resp.header("Location") or location
            resp.close()
            offset += n
            self.progress.event("push", desc.digest, done=offset, total=desc.size)
        return location

    def manifest(self, desc: Descriptor, data: bytes, reference: str) -> None:
        """Put manifest or index ``desc`` (its bytes ``data``) under ``reference`` (a tag
        or its digest)."""
        resp = self.session.send(
            self.ep, "PUT", self.ep.url(f"/{self.session.path}/manifests/{reference}"),
            scope=self.scope, headers={"Content-Type": desc.media_type,
                                       "Content-Length": str(len(data))}, body=data)
        if resp.status not in (200, 201, 202):
            raise self._fail(f"putting manifest {desc.digest}", resp)
        acknowledged = resp.header("OCI-Subject")
        resp.close()
        subject = subject_of(data)
        if subject and not acknowledged:  # no referrers API: keep the tag schema's index
            update_referrers_tag(self.session, self.ep, subject,
                                 descriptor_for(data, desc.media_type, desc.digest))
        self.progress.event("push", desc.digest, done=desc.size, total=desc.size,
                            status="done")
