"""Labels: the keys lamina reads and writes, and the one rule every store applies.

Every label key lamina gives meaning to is defined here, containerd's first
(same strings, same meaning, so containerd and lamina read each other's
objects), then lamina's own under ``lamina.io/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lamina.errors import InvalidArgument

__all__ = [
    "CHECKPOINT",
    "DISTRIBUTION_SOURCE",
    "GC_REF_CONTENT",
    "GC_REF_SNAPSHOT",
    "GC_ROOT",
    "IMAGE_ANNOTATION",
    "LAYER_MTREE",
    "MAX_LABEL_SIZE",
    "OPTIONS_ANNOTATION",
    "PURPOSE",
    "RESTORED_FROM_ANNOTATION",
    "REVISION_CONTAINER",
    "REVISION_IMAGE",
    "REVISION_PREVIOUS",
    "SNAPSHOT_REF",
    "UNCOMPRESSED",
    "update_labels",
    "validate_labels",
]

# -- containerd's --------------------------------------------------------------------

#: Any value: the object is a garbage-collection root (kept while it exists).
GC_ROOT = "containerd.io/gc.root"
#: ``GC_REF_CONTENT`` or ``GC_REF_CONTENT + ".<anything>"``: the value is a digest
#: the object keeps alive (an image's manifests, config and layers).
GC_REF_CONTENT = "containerd.io/gc.ref.content"
#: ``GC_REF_SNAPSHOT + "<snapshotter>[/<anything>]"``: the value is a snapshot key
#: of that snapshotter the object keeps alive (an image config's top layer).
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
#: On a layer's snapshot: the ChainID it was unpacked as.
SNAPSHOT_REF = "containerd.io/snapshot.ref"
#: On a compressed layer blob: the DiffID (digest of the uncompressed tar).
UNCOMPRESSED = "containerd.io/uncompressed"
#: ``DISTRIBUTION_SOURCE + "<registry host>"``: the value is the repository a blob
#: was pulled from (a push may mount it from there).
DISTRIBUTION_SOURCE = "containerd.io/distribution.source."

# -- lamina's ------------------------------------------------------------------------

#: On a lease: what took it (import, unpack, pull, ...).
PURPOSE = "lamina.io/purpose"
#: On a container revision's snapshot: the image it was made from.
REVISION_IMAGE = "lamina.io/revision.image"
#: On a container revision's snapshot: the key of the revision before it.
REVISION_PREVIOUS = "lamina.io/revision.previous"
#: On a container revision's snapshot: the container it belongs to.
REVISION_CONTAINER = "lamina.io/revision.container"
#: On a checkpoint image: the container it was taken from.
CHECKPOINT = "lamina.io/checkpoint"
#: On a committed layer snapshot: the digest of its tree manifest in the content
#: store (see :mod:`lamina.archive.mtree`), which ``lamina check --deep`` compares
#: with the layer's files. A ``gc.ref.content`` label, so the snapshot keeps it.
LAYER_MTREE = GC_REF_CONTENT + ".lamina.mtree"
#: Runtime spec annotations lamina writes.
OPTIONS_ANNOTATION = "lamina.io/options"
IMAGE_ANNOTATION = "lamina.io/image"
RESTORED_FROM_ANNOTATION = "lamina.io/restored-from"

MAX_LABEL_SIZE = 4096
"""A label's key plus value may not exceed this many bytes (UTF-8)."""


def validate_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of ``labels``; InvalidArgument for non-string or empty keys, non-string
    values, or a key plus value over :data:`MAX_LABEL_SIZE` bytes."""
    out: dict[str, str] = {}
    for key, value in (labels or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"label {key!r}: keys and values must be strings")
        if not key:
            raise InvalidArgument("label key must not be empty")
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label {key[:64]!r}: key and value are {size} bytes, "
                f"more than the limit of {MAX_LABEL_SIZE}"
            )
        out[key] = value
    return out


def update_labels(current: Mapping[str, str], new: Mapping[str, str],
                  fieldpaths: Sequence[str], *, what: str) -> dict[str, str]:
    """The labels an update leaves on ``what`` (containerd's rule, for every store).

    No fieldpaths or ``labels``: ``new`` replaces them all. ``labels.<key>``:
    that key takes its value in ``new``, or goes when it is empty or absent
    there. Any other path is InvalidArgument. Empty values are never kept.
    """
    labels = dict(new) if not fieldpaths else dict(current)
    for path in fieldpaths:
        if path == "labels":
            labels = dict(new)
        elif path.startswith("labels.") and path != "labels.":
            key = path[len("labels."):]
            labels[key] = new.get(key, "")
        else:
            raise InvalidArgument(f"cannot update field {path!r} of {what}: "
                                  "only labels and labels.<key> can change")
    return validate_labels({k: v for k, v in labels.items() if v})
