"""OCI whiteout names and overlayfs whiteout representations.

In an OCI layer a file named ``.wh.<name>`` deletes ``<name>`` from the
layers below, and a file named ``.wh..wh..opq`` in a directory hides
everything the lower layers had in that directory. overlayfs represents the
same things in an upper directory as a character device 0/0 named ``<name>``
and as the xattr ``trusted.overlay.opaque=y`` on the directory.
"""

from __future__ import annotations

import os
import stat

from lamina.errors import InvalidArgument

__all__ = [
    "OPAQUE_MARKER",
    "OVERLAY_OPAQUE_XATTR",
    "OVERLAY_XATTR_PREFIX",
    "WHITEOUT_META_PREFIX",
    "WHITEOUT_PREFIX",
    "is_overlay_whiteout",
    "whiteout_name",
    "whiteout_target",
]

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_XATTR_PREFIX = "trusted.overlay."
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"


def whiteout_name(name: str) -> str:
    """The layer entry name that deletes ``name`` (a single path component)."""
    return WHITEOUT_PREFIX + name


def whiteout_target(base: str) -> str:
    """The name a ``.wh.<name>`` entry deletes; InvalidArgument if it names nothing sane."""
    target = base[len(WHITEOUT_PREFIX) :]
    if target in ("", ".", "..") or "/" in target or "\0" in target:
        raise InvalidArgument(f"invalid tar layer: whiteout {base!r} does not name an entry")
    return target


def is_overlay_whiteout(st: os.stat_result) -> bool:
    """Whether ``st`` (an lstat result) is an overlayfs whiteout: char device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
