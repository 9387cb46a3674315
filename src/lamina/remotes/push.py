"""Push an image, and tag images locally.

Everything the image's target reaches is pushed, children before parents:
blobs (layers, configs, a checkpoint's blobs) first, ``concurrency`` at a
time, then manifests, then indexes, the target last under the tag (or the
digest) of the remote reference. Multi-platform indexes and non-image
artifacts go as they are, byte for byte, so their digests do not change.

For each blob:

1. ``HEAD /v2/<name>/blobs/<digest>``: 200 means the registry has it.
2. When the blob's ``containerd.io/distribution.source.<registry>`` label
   names another repository on the same registry, a cross-repository mount
   is asked for: ``POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<repo>``
   (201: done, no bytes sent; 202: the registry declined and opened an
   upload instead).
3. Otherwise ``POST /v2/<name>/blobs/uploads/`` opens an upload, and the
   bytes go in one ``PUT <location>?digest=<digest>`` (monolithic), or, with
   ``chunk_size``, in ``PATCH`` requests carrying ``Content-Range`` followed
   by a closing ``PUT``.

Local artifacts whose ``subject`` is one of the pushed manifests (a
signature, an SBOM) follow, by digest, so they travel with the image.

Manifests go with ``PUT /v2/<name>/manifests/<reference>`` and their own
media type as ``Content-Type``; one with a ``subject`` is also listed in the
referrers tag index when the registry has no referrers API (see
:mod:`.referrers`).
"""

from __future__ import annotations

import io
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import IO

from lamina.content import ContentStore
from lamina.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from lamina.images.resolve import read_blob
from lamina.labels import DISTRIBUTION_SOURCE
from lamina.metadata.images import Image, ImageStore
from lamina.metadata.root import Root
from lamina.oci.types import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Index, Manifest
from lamina.remotes.hosts import Endpoint
from lamina.remotes.reference import Reference, parse_reference
from lamina.remotes.referrers import descriptor_for, subject_of, update_referrers_tag
from lamina.remotes.registry import Registry
from lamina.remotes.session import Session
from lamina.remotes.transport import Response, printable
from lamina.util.progress import Progress

__all__ = ["PushResult", "push", "tag"]


@dataclass
class PushResult:
    remote: str
    digest: str
    uploaded: int = 0
    mounted: int = 0
    existing: int = 0
    referrers: int = 0  # local artifacts pushed along (their subject was pushed)


def _local(images: ImageStore, name: str) -> Image:
    try:
        return images.get(name)
    except NotFound:
        normalised = str(parse_reference(name))
        if normalised == name:
            raise
        return images.get(normalised)


def tag(root: Root, source: str, target: str) -> Image:
    """Name image ``source`` also as ``target`` (normalised); returns the new image."""
    images = root.images()
    src = _local(images, source)
    return images.put(Image(name=str(parse_reference(target)), target=src.target,
                            labels=dict(src.labels)))


def _plan(content: ContentStore, target: Descriptor) -> tuple[list[Descriptor],
                                                               list[Descriptor]]:
    """(blobs, documents children-first) reachable from ``target``."""
    blobs: dict[str, Descriptor] = {}
    documents: list[Descriptor] = []
    seen: set[str] = set()

    def visit(desc: Descriptor, depth: int) -> None:
        if depth > 8:
            raise InvalidArgument(f"{target.digest}: indexes nest too deeply")
        if desc.digest in seen:
            return
        seen.add(desc.digest)
        try:
            if desc.media_type in INDEX_TYPES:
                for child in Index.parse(read_blob(content, desc)).manifests:
                    visit(child, depth + 1)
                documents.append(desc)
            elif desc.media_type in MANIFEST_TYPES:
                m = Manifest.parse(read_blob(content, desc), desc.media_type)
                for d in (m.config, *m.layers):
                    content.info(d.digest)
                    blobs.setdefault(d.digest, d)
                documents.append(desc)
            else:
                content.info(desc.digest)
                blobs.setdefault(desc.digest, desc)
        except NotFound:
            raise NotFound(f"cannot push: {desc.digest} ({desc.media_type}) is not in the "
                           "content store (pulled for one platform only? pull with "
                           "--all-platforms)") from None

    visit(target, 0)
    return list(blobs.values()), documents


class _Pusher:
    def __init__(self, session: Session, ref: Reference, content: ContentStore,
                 progress: Progress, chunk_size: int) -> None:
        self.session = session
        self.ref = ref
        self.content = content
        self.progress = progress
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

    def blob(self, desc: Descriptor) -> str:
        """Push one blob; returns "existing", "mounted" or "uploaded".

        Afterwards the blob's source label names this repository too, so a push
        to another repository of the registry mounts it instead of uploading."""
        outcome = self._blob(desc)
        key = DISTRIBUTION_SOURCE + self.ref.domain
        info = self.content.info(desc.digest)
        repos = [r for r in info.labels.get(key, "").split(",") if r]
        if self.session.path not in repos:
            labels = {**info.labels, key: ",".join([*repos, self.session.path])}
            self.content.update(replace(info, labels=labels), f"labels.{key}")
        return outcome

    def _blob(self, desc: Descriptor) -> str:
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
        labels = self.content.info(desc.digest).labels
        source = labels.get(DISTRIBUTION_SOURCE + self.ref.domain, "")
        repos = [r for r in source.split(",") if r and r != self.session.path]
        if repos:
            query = [("mount", desc.digest), ("from", repos[0])]
            scope = f"{scope} repository:{repos[0]}:pull"
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
            location = self._chunks(desc, location)
            body: bytes | Callable[[], IO[bytes]] | None = None
            length = 0
        else:
            body = self._opener(desc)
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

    def _opener(self, desc: Descriptor, offset: int = 0,
                size: int = -1) -> Callable[[], IO[bytes]]:
        def open_() -> IO[bytes]:
            f = self.content.reader(desc.digest)
            f.seek(offset)
            if size < 0:
                return f
            try:
                return io.BytesIO(f.read(size))
            finally:
                f.close()
        return open_

    def _chunks(self, desc: Descriptor, location: str) -> str:
        offset = 0
        while offset < desc.size:
            n = min(self.chunk_size, desc.size - offset)
            resp = self.session.send(
                self.ep, "PATCH", self._url(location), scope=self.scope,
                headers={"Content-Type": "application/octet-stream",
                         "Content-Range": f"{offset}-{offset + n - 1}",
                         "Content-Length": str(n)},
                body=self._opener(desc, offset, n))
            if resp.status != 202:
                raise self._fail(f"uploading {desc.digest} at {offset}", resp)
            location = resp.header("Location") or location
            resp.close()
            offset += n
            self.progress.event("push", desc.digest, done=offset, total=desc.size)
        return location

    def document(self, desc: Descriptor, reference: str) -> None:
        data = read_blob(self.content, desc)
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


def _local_referrers(root: Root, subjects: set[str]) -> list[Descriptor]:
    """Targets of local images whose manifest's ``subject`` is one of ``subjects``."""
    content = root.content()
    out: dict[str, Descriptor] = {}
    for image in root.images().list():
        target = image.target
        if target.media_type not in MANIFEST_TYPES or target.digest in subjects:
            continue
        try:
            data = read_blob(content, target)
        except (NotFound, InvalidArgument):
            continue
        if subject_of(data) in subjects:
            out.setdefault(target.digest, target)
    return list(out.values())


def push(registry: Registry, local: str, remote: str | None = None, *, root: Root,
         progress: Progress | None = None, concurrency: int = 3,
         chunk_size: int = 0, referrers: bool = True) -> PushResult:
    """Push local image ``local`` to ``remote`` (default: its own name).

    With ``referrers``, local artifacts whose ``subject`` is one of the pushed
    manifests (signatures, SBOMs...) are pushed after it, by digest."""
    progress = progress or Progress()
    image = _local(root.images(), local)
    ref = parse_reference(remote or image.name)
    if ref.digest and ref.digest != image.target.digest:
        raise InvalidArgument(f"{remote}: names {ref.digest}, but {local} is "
                              f"{image.target.digest}")
    content = root.content()
    session = registry.session(ref)
    pusher = _Pusher(session, ref, content, progress, chunk_size)
    result = PushResult(remote=str(ref), digest=image.target.digest)
    pushed = _push_tree(pusher, content, image.target, ref.tag or image.target.digest,
                        concurrency, result)
    if referrers:
        for artifact in _local_referrers(root, pushed):
            _push_tree(pusher, content, artifact, artifact.digest, concurrency, result)
            result.referrers += 1
    return result


def _push_tree(pusher: _Pusher, content: ContentStore, target: Descriptor, reference: str,
               concurrency: int, result: PushResult) -> set[str]:
    """Push ``target`` and all it reaches; the digests of the documents pushed."""
    blobs, documents = _plan(content, target)
    with ThreadPoolExecutor(max_workers=max(1, concurrency),
                            thread_name_prefix="push") as pool:
        for outcome in pool.map(pusher.blob, blobs):
            if outcome == "uploaded":
                result.uploaded += 1
            elif outcome == "mounted":
                result.mounted += 1
            else:
                result.existing += 1
    for desc in documents[:-1]:
        pusher.document(desc, desc.digest)
    pusher.document(target, reference)
    return {d.digest for d in documents}
