"""What ``image ls`` and ``image inspect`` read, from any image store: a root's,
or a server's through ``--address``.

A :class:`Catalog` holds image records (:class:`~lamina.metadata.images.ImageRecords`)
and opens a content store and, for sizes, a snapshotter when an image needs them
(listing no images opens neither: an empty root's ``image ls`` starts fast); the
records are selected with ``image ls``'s filters (:mod:`lamina.images.listing`)
and resolved and measured by :mod:`lamina.images.summary` on this side of the
wire, so a server's images read exactly as a local root's do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lamina.errors import Damaged
from lamina.images.listing import parse_filters
from lamina.metadata.images import Image, ImageRecords

# lamina.images.summary (the documents' walk, the content store) is imported for
# the first image resolved: an empty root's image ls needs none of it.
if TYPE_CHECKING:
    from lamina.content import ContentStore
    from lamina.images.summary import ImageSummary
    from lamina.snapshots import Snapshotter

__all__ = ["Catalog"]


class Catalog:
    """The images of ``images``, their documents in the store ``content`` opens, their
    layers (for the unpacked size) in the snapshotter ``snapshots`` opens; each is
    opened once, when an image is first resolved."""

    def __init__(self, images: ImageRecords, *, content: Callable[[], ContentStore],
                 snapshots: Callable[[], Snapshotter | None] = lambda: None) -> None:
        self.images = images
        self._open_content = content
        self._open_snapshots = snapshots

    @functools.cached_property
    def content(self) -> ContentStore:
        return self._open_content()

    @functools.cached_property
    def snapshots(self) -> Snapshotter | None:
        return self._open_snapshots()

    def select(self, filters: Sequence[str] = ()) -> list[Image]:
        """The images ``filters`` select (see :mod:`lamina.images.listing`); a damaged
        record is :class:`~lamina.errors.Damaged`."""
        images, damaged = self.listing(filters)
        if damaged:
            raise damaged[0]
        return images

    def listing(self, filters: Sequence[str] = ()) -> tuple[list[Image], list[Damaged]]:
        """The images ``filters`` select that read, and the error of each damaged
        record, so that a listing shows the others and tells of those."""
        wanted = parse_filters(filters, lookup=self.images.get) if filters else None
        images, damaged = self.images.readable()
        if wanted is not None:
            images = [i for i in images if wanted(i)]
        return images, damaged

    def summaries(self, filters: Sequence[str] = ()) -> list[ImageSummary]:
        """The images ``filters`` select, resolved and measured."""
        return self.summarize(self.select(filters))

    def summarize(self, images: Sequence[Image]) -> list[ImageSummary]:
        """``images`` resolved and measured."""
        if not images:
            return []
        from lamina.images.summary import summarize_all

        return summarize_all(list(images), content=self.content, snapshots=self.snapshots)

    def summary(self, name: str) -> ImageSummary:
        """Image ``name`` (any spelling of it) resolved and measured."""
        from lamina.images.summary import summarize

        return summarize(self.images.get(name), content=self.content,
                         snapshots=self.snapshots)

    def native(self, name: str) -> dict[str, Any]:
        """lamina's record of image ``name`` and the documents it resolves to."""
        from lamina.images.summary import native_view

        return native_view(self.summary(name), content=self.content)
