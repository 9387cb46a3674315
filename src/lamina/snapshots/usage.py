"""Disk usage of a directory tree, counting each inode once.

The walk (:class:`lamina.fs.walk.Walk`) works at any depth: relative to
directory descriptors, never following symlinks and never building a path.
"""

from __future__ import annotations

import os
import stat

from lamina.fs.tree import DIR_FLAGS
from lamina.fs.walk import Walk, enter_present
from lamina.snapshots import Usage

__all__ = ["disk_usage"]


def disk_usage(path: str | os.PathLike[str]) -> Usage:
    """Blocks actually used (st_blocks * 512) and inodes below ``path``, itself included."""
    root_fd = os.open(path, DIR_FLAGS)
    try:
        root = os.fstat(root_fd)
        seen = {(root.st_dev, root.st_ino)}
        size = root.st_blocks * 512
        walk = Walk(root_fd, sort=False)
        for e in walk:
            ident = (e.stat.st_dev, e.stat.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            size += e.stat.st_blocks * 512
            if stat.S_ISDIR(e.stat.st_mode):
                enter_present(walk)
    finally:
        os.close(root_fd)
    return Usage(size=size, inodes=len(seen))
