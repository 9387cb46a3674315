"""A directory's metadata as the root of the EROFS image of the layer above it.

A layer that does not list its root takes its parent's (in an overlay stack
the topmost layer's root is what a mount shows): both the streamed layers of
a pull and the images :mod:`lamina.snapshots.erofs.convert` writes read it
here. Its own module, so a pull does not import the converter's diff writer.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from lamina.erofs.inode import RootMeta
from lamina.mounts.overlay import overlay_xattr_prefix

__all__ = ["as_lower_root", "root_meta"]


def root_meta(directory: Path) -> RootMeta:
    """The metadata of ``directory`` as an image's root (overlay's own xattrs left out)."""
    st = os.stat(directory)
    xattrs = tuple((k, os.getxattr(directory, k)) for k in sorted(os.listxattr(directory))
                   if not k.startswith(overlay_xattr_prefix()))
    return RootMeta(mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid,
                    mtime_ns=st.st_mtime_ns, xattrs=xattrs)


def as_lower_root(meta: RootMeta) -> RootMeta:
    """``meta``, the root of a layer's image, as :func:`root_meta` reads it on
    that layer's mount (overlay's own xattrs left out): what the layer above
    takes when it does not list its root."""
    prefix = overlay_xattr_prefix()
    return replace(meta, xattrs=tuple((k, v) for k, v in meta.xattrs if not k.startswith(prefix)))
