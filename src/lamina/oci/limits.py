"""The bounds of one walk over an image's descriptor graph, the same for every walk.

Pull, push, import, export and unpack all follow index → manifest → config
and layers, with documents from a registry or from an archive: a document
someone else wrote decides how much work a walk does. One set of bounds
holds for all of them, so content that one path accepted is never refused by
another (an imported image that could not be pushed, a pulled one that could
not be exported):

:data:`MAX_DOCUMENT` (4 MiB)
    one manifest, index or config, read whole into memory. containerd refuses
    manifests above 4 MiB when it fetches them and the distribution registry
    when they are pushed; a larger document could be imported but never
    pushed, so import refuses it too (it allowed 16 MiB before).
:data:`MAX_DEPTH` (8)
    indexes nested in indexes: no real image nests more than two.
:data:`MAX_DESCRIPTORS` (10,000)
    distinct descriptors one walk reaches, each manifest's layer entries all
    counted (they are all unpacked).
:data:`MAX_DOCUMENT_BYTES` (64 MiB)
    the manifests, indexes and configs of one walk together: sixteen
    documents of the largest size, far above any real image.

Depth beyond the bound is InvalidArgument (no valid image does that); the
two budgets are ResourceExhausted, raised before the documents over budget
are read (a budget lamina sets, not a malformed document).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LIMITS", "MAX_DEPTH", "MAX_DESCRIPTORS", "MAX_DOCUMENT", "MAX_DOCUMENT_BYTES",
           "Limits"]

MAX_DOCUMENT = 4 << 20
MAX_DEPTH = 8
MAX_DESCRIPTORS = 10_000
MAX_DOCUMENT_BYTES = 64 << 20


@dataclass(frozen=True)
class Limits:
    """One walk's bounds (see the module docs); tests shrink them."""

    document: int = MAX_DOCUMENT
    depth: int = MAX_DEPTH
    descriptors: int = MAX_DESCRIPTORS
    document_bytes: int = MAX_DOCUMENT_BYTES


LIMITS = Limits()
