"""Local image names: finding an image by any spelling of its reference, naming it anew."""

from __future__ import annotations

from lamina.errors import NotFound
from lamina.metadata.images import Image, ImageStore
from lamina.metadata.root import Root
from lamina.remotes.reference import parse_reference

__all__ = ["lookup", "tag"]


def lookup(images: ImageStore, name: str) -> Image:
    """Image ``name``, as given or normalised (``app:1`` finds ``docker.io/library/app:1``)."""
    try:
        return images.get(name)
    except NotFound:
        normalised = str(parse_reference(name))
        if normalised == name:
            raise
        return images.get(normalised)


def tag(root: Root, source: str, target: str) -> Image:
    """Name image ``source`` of ``root`` also as ``target`` (normalised); returns the
    new image."""
    images = root.images()
    src = lookup(images, source)
    return images.put(Image(name=str(parse_reference(target)), target=src.target,
                            labels=dict(src.labels)))
