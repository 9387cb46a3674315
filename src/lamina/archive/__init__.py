"""OCI layers: apply a layer onto a directory, create a layer from a diff.

* :func:`apply_layer` unpacks a (gzip/zstd/plain) layer safely below a root,
  with whiteouts, opaque directories and full metadata, returning its DiffID.
* :func:`write_diff` and :func:`write_overlay_diff` create layers from two
  trees or from an overlayfs upper directory.
* :mod:`lamina.archive.compression` detects and handles layer compression and
  media types.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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

# A module of this package (limits, say) is often all an importer wants: the names
# above are imported on first use, not with the package (start-up time of every
# command that only lists or removes).
_MODULE_OF = {
    "AppliedLayer": "apply", "apply_layer": "apply",
    "DiffResult": "changes", "write_diff": "changes", "write_overlay_diff": "changes",
    "Compression": "compression", "compression_from_media_type": "compression",
    "compressor": "compression", "detect": "compression", "media_type": "compression",
    "open_decompressed": "compression",
}


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
