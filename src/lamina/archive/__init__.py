"""OCI layers: apply a layer onto a directory, create a layer from a diff.

* :func:`apply_layer` unpacks a (gzip/zstd/plain) layer safely below a root,
  with whiteouts, opaque directories and full metadata, returning its DiffID.
* :func:`write_diff` and :func:`write_overlay_diff` create layers from two
  trees or from an overlayfs upper directory.
* :mod:`lamina.archive.compression` detects and handles layer compression and
  media types.
"""

from lamina.archive.apply import AppliedLayer, apply_layer
from lamina.archive.changes import DiffResult, write_diff, write_overlay_diff
from lamina.archive.compression import (
    Compression,
    compression_from_media_type,
    compressor,
    detect,
    media_type,
    open_decompressed,
)

__all__ = [
    "AppliedLayer",
    "Compression",
    "DiffResult",
    "apply_layer",
    "compression_from_media_type",
    "compressor",
    "detect",
    "media_type",
    "open_decompressed",
    "write_diff",
    "write_overlay_diff",
]
