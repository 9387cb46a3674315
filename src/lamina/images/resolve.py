"""Following an image's target through the content store: index → manifest → config."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from lamina.errors import InvalidArgument, NotFound
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

__all__ = ["MAX_DOCUMENT", "manifest_for", "read_blob", "walk_descriptors"]

MAX_DOCUMENT = 16 << 20
"""Manifests, indexes and configs larger than this are refused, not read into memory."""


def read_blob(content: ContentStore, desc: Descriptor) -> bytes:
    """The bytes of a small JSON blob, checked against its descriptor."""
    if desc.size > MAX_DOCUMENT:
        raise InvalidArgument(f"{desc.digest}: {desc.size} bytes is too large for a document")
    with content.reader(desc.digest) as r:
        data = r.read(MAX_DOCUMENT + 1)
    if len(data) != desc.size or f"sha256:{hashlib.sha256(data).hexdigest()}" != desc.digest:
        raise InvalidArgument(f"{desc.digest}: content does not match its descriptor")
    return data


def manifest_for(
    content: ContentStore, target: Descriptor, *, platform: Mapping[str, str] | None = None
) -> tuple[Descriptor, Manifest, ImageConfig]:
    """The manifest (and its config) of ``target`` for ``platform`` (the host by default)."""
    want = platform or host_platform()
    desc = target
    for _ in range(8):  # indexes may nest; bound it
        if desc.media_type in INDEX_TYPES:
            index = Index.parse(read_blob(content, desc))
            chosen = select_children(index.manifests, [want], where=desc.digest)
            if not chosen or chosen[0].media_type not in MANIFEST_TYPES | INDEX_TYPES:
                raise NotFound(f"{desc.digest}: the index lists no manifest")
            desc = chosen[0]  # the image's (an index's other blobs come after it)
            continue
        if desc.media_type in MANIFEST_TYPES:
            manifest = Manifest.parse(read_blob(content, desc), desc.media_type)
            if manifest.config.media_type not in CONFIG_TYPES:
                raise InvalidArgument(
                    f"{desc.digest}: config media type {manifest.config.media_type!r} "
                    "is not an image config"
                )
            config = ImageConfig.parse(read_blob(content, manifest.config))
            return desc, manifest, config
        raise InvalidArgument(f"{desc.digest}: cannot unpack media type {desc.media_type!r}")
    raise InvalidArgument(f"{target.digest}: indexes nest too deeply")


def walk_descriptors(content: ContentStore, target: Descriptor) -> Iterator[Descriptor]:
    """Every descriptor reachable from ``target`` (itself first), each once."""
    seen: set[str] = set()
    stack = [target]
    while stack:
        desc = stack.pop()
        if desc.digest in seen:
            continue
        seen.add(desc.digest)
        yield desc
        if desc.media_type in INDEX_TYPES:
            stack.extend(reversed(Index.parse(read_blob(content, desc)).manifests))
        elif desc.media_type in MANIFEST_TYPES:
            m = Manifest.parse(read_blob(content, desc), desc.media_type)
            stack.extend(reversed([m.config, *m.layers]))
