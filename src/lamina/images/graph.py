"""The descriptor graph of an image: one walk, its handlers, and its GC labels.

An image is a graph of descriptors: an index lists manifests (or indexes, or
other blobs: a checkpoint's), a manifest names a config and layers. Every
path that follows it — pull (documents from a registry), push, export, the
unpack's choice of manifest, the GC labels of import and checkpoint — runs
:func:`walk`, as containerd's ``images.Dispatch`` runs its handlers:

* a *handler* is called once per descriptor reached and returns the
  children to follow (a leaf returns none). :func:`children` reads a
  document's children; :func:`select` narrows an index's to the wanted
  platforms (:mod:`lamina.oci.platforms`), as containerd's
  ``FilterPlatforms``/``LimitManifests`` do;
* the walk visits each descriptor once, however often indexes repeat it,
  depth first in the documents' order, and holds every walk to the same
  bounds (:mod:`lamina.oci.limits`): the children a handler returns are
  counted (and their document bytes added) *before* any is visited, so a
  document that names too much is refused before anything it names is read;
* ``after`` sees each descriptor once all it reaches was visited (children
  before parents: the order a push needs).

:func:`gc_labels` is the one place that writes containerd's
``containerd.io/gc.ref.content.*`` labels from a document's children.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from lamina.content import set_labels, write_blob
from lamina.content.digest import sha256_digest
from lamina.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from lamina.labels import GC_REF_CONTENT
from lamina.oci.limits import LIMITS, Limits
from lamina.oci.platforms import select_children
from lamina.oci.types import (
    CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    host_platform,
)

if TYPE_CHECKING:
    from lamina.content import ContentStore

__all__ = [
    "DOCUMENT_TYPES", "Handler", "any_manifest", "children", "gc_labels", "label_references",
    "manifest_for", "put_document", "read_document", "select", "stored", "walk",
    "walk_descriptors",
]

#: What a walk reads and parses: the rest are leaves (configs are read, not followed).
DOCUMENT_TYPES = MANIFEST_TYPES | INDEX_TYPES
_COUNTED_BYTES = MANIFEST_TYPES | INDEX_TYPES | CONFIG_TYPES

#: Called once per descriptor reached; returns the children to follow.
Handler = Callable[[Descriptor], Sequence[Descriptor]]


def read_document(content: ContentStore, desc: Descriptor, *,
                  limits: Limits = LIMITS) -> bytes:
    """The bytes of a manifest, index or config, checked against its descriptor
    (and refused above the document bound before they are read)."""
    if desc.size > limits.document:
        raise InvalidArgument(f"{desc.digest}: a document of {desc.size} bytes is larger "
                              f"than the {limits.document} allowed")
    with content.reader(desc.digest) as r:
        data = r.read(limits.document + 1)
    if len(data) != desc.size or sha256_digest(data) != desc.digest:
        raise InvalidArgument(f"{desc.digest}: content does not match its descriptor")
    return data


def put_document(content: ContentStore, data: bytes,
                 labels: dict[str, str] | None = None) -> str:
    """Store a small document (manifest, index, config); returns its digest."""
    digest = sha256_digest(data)
    with contextlib.suppress(AlreadyExists):
        write_blob(content, f"document-{digest}", data, expected=digest, labels=labels)
    return digest


def children(desc: Descriptor, data: bytes) -> list[Descriptor]:
    """A document's children: a manifest's config and layers (every entry, in
    order), an index's entries (each digest once, first entry kept)."""
    if desc.media_type in MANIFEST_TYPES:
        m = Manifest.parse(data, desc.media_type)
        return [m.config, *m.layers]
    if desc.media_type in INDEX_TYPES:
        firsts: dict[str, Descriptor] = {}
        for c in Index.parse(data).manifests:
            firsts.setdefault(c.digest, c)
        return list(firsts.values())
    return []


def select(desc: Descriptor, found: Sequence[Descriptor],
           platforms: Sequence[Mapping[str, str]] | None, *, where: str) -> list[Descriptor]:
    """``found`` (the children of ``desc``) narrowed to ``platforms`` when ``desc``
    is an index (None: every platform's)."""
    if platforms is None or desc.media_type not in INDEX_TYPES:
        return list(found)
    return select_children(found, platforms, where=where)


def gc_labels(desc: Descriptor, found: Sequence[Descriptor]) -> dict[str, str]:
    """containerd's GC reference labels of document ``desc`` whose followed children
    are ``found``: a manifest's ``config`` and ``l.<i>``, an index's ``m.<i>``."""
    prefix = GC_REF_CONTENT + "."
    if desc.media_type in MANIFEST_TYPES and found:
        return {f"{prefix}config": found[0].digest,
                **{f"{prefix}l.{i}": c.digest for i, c in enumerate(found[1:])}}
    if desc.media_type in INDEX_TYPES:
        return {f"{prefix}m.{i}": c.digest for i, c in enumerate(found)}
    return {}


class _Budget:
    """What one walk reached and spent (see :mod:`lamina.oci.limits`)."""

    def __init__(self, limits: Limits, where: str) -> None:
        self.limits = limits
        self.where = where
        self.seen: set[str] = set()
        self.count = 0
        self.document_bytes = 0

    def reach(self, found: Sequence[Descriptor], *, every: bool) -> list[Descriptor]:
        """The descriptors of ``found`` not reached before, charged to the budget
        (``every``: each entry counts, repeated or not)."""
        new: list[Descriptor] = []
        for c in found:
            if c.digest in self.seen:
                continue
            self.seen.add(c.digest)
            new.append(c)
            if c.media_type in _COUNTED_BYTES:
                self.document_bytes += c.size
        self.count += len(found) if every else len(new)
        if self.count > self.limits.descriptors:
            raise ResourceExhausted(
                f"{self.where}: the image reaches more than {self.limits.descriptors} "
                "descriptors (manifests, configs, layers); refused before fetching them")
        if self.document_bytes > self.limits.document_bytes:
            raise ResourceExhausted(
                f"{self.where}: the image's manifests, indexes and configs add up to more "
                f"than {self.limits.document_bytes} bytes; refused before fetching them")
        return new


def walk(root: Descriptor, handler: Handler, *, where: str, limits: Limits = LIMITS,
         after: Callable[[Descriptor], None] | None = None) -> None:
    """Call ``handler`` on ``root`` and every descriptor it leads to (module docs);
    ``where`` names the walk in its errors."""
    budget = _Budget(limits, where)
    budget.reach([root], every=False)
    stack: list[tuple[Descriptor, int, bool]] = [(root, 0, False)]
    while stack:
        desc, depth, done = stack.pop()
        if done:
            assert after is not None
            after(desc)
            continue
        if depth >= limits.depth and desc.media_type in DOCUMENT_TYPES:
            raise InvalidArgument(f"{where}: indexes nest more than {limits.depth} deep")
        found = handler(desc)
        new = budget.reach(found, every=desc.media_type in MANIFEST_TYPES)
        if after is not None:
            stack.append((desc, depth, True))
        stack.extend((c, depth + 1, False) for c in reversed(new))


def stored(content: ContentStore, *, limits: Limits = LIMITS) -> Handler:
    """A handler reading documents from ``content``: all their children
    (containerd's ``ChildrenHandler``)."""
    def handler(desc: Descriptor) -> Sequence[Descriptor]:
        if desc.media_type not in DOCUMENT_TYPES:
            return []
        return children(desc, read_document(content, desc, limits=limits))
    return handler


def walk_descriptors(content: ContentStore, target: Descriptor, *,
                     limits: Limits = LIMITS) -> Iterator[Descriptor]:
    """Every descriptor reachable from ``target`` (itself first), each once."""
    out: list[Descriptor] = []
    read = stored(content, limits=limits)

    def handler(desc: Descriptor) -> Sequence[Descriptor]:
        out.append(desc)
        return read(desc)

    walk(target, handler, where=target.digest, limits=limits)
    return iter(out)


def label_references(content: ContentStore, target: Descriptor, *,
                     limits: Limits = LIMITS) -> None:
    """Write containerd's GC reference labels from ``target`` down to every layer."""
    read = stored(content, limits=limits)

    def handler(desc: Descriptor) -> Sequence[Descriptor]:
        found = read(desc)
        labels = gc_labels(desc, found)
        if labels:
            set_labels(content, desc.digest, labels)
        return found

    walk(target, handler, where=target.digest, limits=limits)


def manifest_for(
    content: ContentStore, target: Descriptor, *, platform: Mapping[str, str] | None = None,
    limits: Limits = LIMITS,
) -> tuple[Descriptor, Manifest, ImageConfig]:
    """The manifest (and its config) of ``target`` for ``platform`` (the host by default)."""
    want = platform or host_platform()
    chosen: list[tuple[Descriptor, Manifest]] = []

    def handler(desc: Descriptor) -> Sequence[Descriptor]:
        if desc.media_type in INDEX_TYPES:
            found = select(desc, children(desc, read_document(content, desc, limits=limits)),
                           [want], where=desc.digest)
            if not found or found[0].media_type not in DOCUMENT_TYPES:
                raise NotFound(f"{desc.digest}: the index lists no manifest")
            return found[:1]  # the image's (an index's other blobs come after it)
        if desc.media_type in MANIFEST_TYPES:
            data = read_document(content, desc, limits=limits)
            chosen.append((desc, Manifest.parse(data, desc.media_type)))
            return []
        raise InvalidArgument(f"{desc.digest}: cannot unpack media type {desc.media_type!r}")

    walk(target, handler, where=target.digest, limits=limits)
    desc, manifest = chosen[0]
    if manifest.config.media_type not in CONFIG_TYPES:
        raise InvalidArgument(f"{desc.digest}: config media type "
                              f"{manifest.config.media_type!r} is not an image config")
    config = ImageConfig.parse(read_document(content, manifest.config, limits=limits))
    return desc, manifest, config


def any_manifest(
    content: ContentStore, target: Descriptor, *, limits: Limits = LIMITS,
) -> tuple[Descriptor, Manifest, ImageConfig]:
    """The host's manifest of ``target`` (:func:`manifest_for`), else the first
    stored manifest of another platform the index names: what a listing of the
    images describes (an image pulled for another platform is listed too)."""
    try:
        return manifest_for(content, target, limits=limits)
    except NotFound:
        if target.media_type not in INDEX_TYPES:
            raise
        index = Index.parse(read_document(content, target, limits=limits))
        for child in index.manifests:
            want = {k: v for k, v in (child.platform or {}).items() if isinstance(v, str)}
            if child.media_type not in MANIFEST_TYPES or not {"os", "architecture"} <= set(want):
                continue
            try:
                return manifest_for(content, target, platform=want, limits=limits)
            except NotFound:
                continue
        raise
