"""Local image names: finding an image by any spelling of its reference, naming it anew.

A name is kept as it was given (as ctr keeps it) and found by any spelling of the
same reference: the image store reads names through
:func:`lamina.oci.reference.spellings`, so ``demo:1`` and ``docker.io/library/demo:1``
are one image for every command (import, tag, pull, push, rm, run, export,
checkpoint), and writing one of them updates the record the other names.
"""

from __future__ import annotations

from lamina.metadata.images import Image, ImageRecords
from lamina.metadata.root import Root
from lamina.oci.reference import normalize_name

__all__ = ["add_name", "tag"]


def tag(root: Root, source: str, target: str) -> Image:
    """Name image ``source`` of ``root`` also as ``target`` (see :func:`add_name`)."""
    return add_name(root.images(), source, target)


def add_name(images: ImageRecords, source: str, target: str) -> Image:
    """Name image ``source`` of ``images`` (a root's or a server's) also as ``target``
    (kept as given, once it reads as a reference); returns the new image."""
    normalize_name(target)  # InvalidArgument for a name no registry could hold
    src = images.get(source)
    return images.put(Image(name=target, target=src.target, labels=dict(src.labels)))
