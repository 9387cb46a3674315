"""Push an image and everything it reaches to a registry.

Everything the image's target reaches (:func:`lamina.images.graph.walk`, with
the bounds of every walk) is pushed, children before parents:
blobs (layers, configs, a checkpoint's blobs) first, ``concurrency`` at a
time, then manifests, then indexes, the target last under the tag (or the
digest) of the remote reference. Multi-platform indexes and non-image
artifacts go as they are, byte for byte, so their digests do not change.

Each blob goes through :class:`lamina.remotes.pusher.Pusher` (an existence
check, a cross-repository mount when the blob's
``containerd.io/distribution.source.<registry>`` label names another
repository on the same registry, else an upload read from the content store).

Local artifacts whose ``subject`` is one of the pushed manifests (a
signature, an SBOM) follow, by digest, so they travel with the image.

Manifests and indexes go after their children (see
:meth:`lamina.remotes.pusher.Pusher.manifest`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from lamina.content import ContentStore, set_labels
from lamina.errors import InvalidArgument, NotFound
from lamina.images import graph
from lamina.images.pull import with_source
from lamina.labels import DISTRIBUTION_SOURCE
from lamina.metadata.root import Root
from lamina.oci.reference import Reference, parse_reference
from lamina.oci.types import MANIFEST_TYPES, Descriptor
from lamina.remotes.pusher import Outcome, Pusher, Source
from lamina.remotes.referrers import subject_of
from lamina.remotes.registry import Registry
from lamina.util.progress import Progress

__all__ = ["PushResult", "push"]


@dataclass
class PushResult:
    remote: str
    digest: str
    uploaded: int = 0
    mounted: int = 0
    existing: int = 0
    referrers: int = 0  # local artifacts pushed along (their subject was pushed)


def _plan(content: ContentStore, target: Descriptor) -> tuple[list[Descriptor],
                                                               list[Descriptor]]:
    """(blobs, documents children-first) reachable from ``target``."""
    blobs: dict[str, Descriptor] = {}
    documents: list[Descriptor] = []
    read = graph.stored(content)

    def handler(desc: Descriptor) -> Sequence[Descriptor]:
        try:
            if desc.media_type in graph.DOCUMENT_TYPES:
                return read(desc)
            content.info(desc.digest)
            blobs.setdefault(desc.digest, desc)
            return []
        except NotFound:
            raise NotFound(f"cannot push: {desc.digest} ({desc.media_type}) is not in the "
                           "content store (pulled for one platform only? pull with "
                           "--all-platforms)") from None

    def after(desc: Descriptor) -> None:
        if desc.media_type in graph.DOCUMENT_TYPES:
            documents.append(desc)

    graph.walk(target, handler, where=target.digest, after=after)
    return list(blobs.values()), documents


class _Blobs:
    """Pushes blobs from the content store, and labels them as pushed."""

    def __init__(self, pusher: Pusher, ref: Reference, content: ContentStore) -> None:
        self.pusher = pusher
        self.ref = ref
        self.content = content

    def push(self, desc: Descriptor) -> Outcome:
        """Push one blob; mounted from another repository of the registry that the
        blob's source label names, when there is one. Afterwards the label names
        this repository too, so a push to another repository mounts it."""
        labels = self.content.info(desc.digest).labels
        source = labels.get(DISTRIBUTION_SOURCE + self.ref.domain, "")
        repos = [r for r in source.split(",") if r and r != self.ref.path]
        outcome = self.pusher.blob(desc, self._source(desc),
                                   mount_from=repos[0] if repos else "")
        info = self.content.info(desc.digest)
        set_labels(self.content, desc.digest, with_source(info.labels, self.ref), info=info)
        return outcome

    def _source(self, desc: Descriptor) -> Source:
        def open_(offset: int, size: int) -> IO[bytes]:
            f = self.content.reader(desc.digest)
            f.seek(offset)
            if size < 0:
                return f
            try:
                return io.BytesIO(f.read(size))
            finally:
                f.close()
        return open_


def _local_referrers(root: Root, subjects: set[str]) -> list[Descriptor]:
    """Targets of local images whose manifest's ``subject`` is one of ``subjects``."""
    content = root.content()
    out: dict[str, Descriptor] = {}
    for image in root.images().list():
        target = image.target
        if target.media_type not in MANIFEST_TYPES or target.digest in subjects:
            continue
        try:
            data = graph.read_document(content, target)
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
    image = root.images().get(local)
    ref = parse_reference(remote or image.name)
    if ref.digest and ref.digest != image.target.digest:
        raise InvalidArgument(f"{remote}: names {ref.digest}, but {local} is "
                              f"{image.target.digest}")
    content = root.content()
    pusher = Pusher(registry.session(ref), progress=progress, chunk_size=chunk_size)
    blobs = _Blobs(pusher, ref, content)
    result = PushResult(remote=str(ref), digest=image.target.digest)
    pushed = _push_tree(blobs, image.target, ref.tag or image.target.digest,
                        concurrency, result)
    if referrers:
        for artifact in _local_referrers(root, pushed):
            _push_tree(blobs, artifact, artifact.digest, concurrency, result)
            result.referrers += 1
    return result


def _push_tree(blobs: _Blobs, target: Descriptor, reference: str, concurrency: int,
               result: PushResult) -> set[str]:
    """Push ``target`` and all it reaches; the digests of the documents pushed."""
    content = blobs.content
    leaves, documents = _plan(content, target)
    for desc in leaves:
        blobs.pusher.progress.waiting("push", desc.digest, total=desc.size)
    with ThreadPoolExecutor(max_workers=max(1, concurrency),
                            thread_name_prefix="push") as pool:
        for outcome in pool.map(blobs.push, leaves):
            if outcome == "uploaded":
                result.uploaded += 1
            elif outcome == "mounted":
                result.mounted += 1
            else:
                result.existing += 1
    for i, desc in enumerate(documents):  # the target last, under ``reference``
        last = i == len(documents) - 1
        blobs.pusher.manifest(desc, graph.read_document(content, desc),
                              reference if last else desc.digest)
    return {d.digest for d in documents}
