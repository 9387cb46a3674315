"""Disk usage of a directory tree, counting each inode once."""

from __future__ import annotations

import os

from lamina.snapshots import Usage

__all__ = ["disk_usage"]


def disk_usage(path: str | os.PathLike[str]) -> Usage:
    """Blocks actually used (st_blocks * 512) and inodes below ``path``, itself included."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [os.fspath(path)]
    root = os.lstat(stack[0])
    seen.add((root.st_dev, root.st_ino))
    size += root.st_blocks * 512
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                ident = (st.st_dev, st.st_ino)
                if ident in seen:
                    continue
                seen.add(ident)
                size += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))
