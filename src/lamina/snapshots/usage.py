"""Disk usage of a directory tree, counting each inode once.

The walk works at any depth: relative to directory descriptors, with an
explicit stack (:class:`lamina.fs.tree.DirStack`), never following symlinks
and never building a path.
"""

from __future__ import annotations

import os

from lamina.fs.tree import DIR_FLAGS, DirStack
from lamina.snapshots import Usage

__all__ = ["disk_usage"]


def disk_usage(path: str | os.PathLike[str]) -> Usage:
    """Blocks actually used (st_blocks * 512) and inodes below ``path``, itself included."""
    root_fd = os.open(path, DIR_FLAGS)
    try:
        root = os.fstat(root_fd)
        seen = {(root.st_dev, root.st_ino)}
        size = root.st_blocks * 512
        stack = DirStack(root_fd)
        try:
            pending: list[list[str]] = []  # per open directory: subdirectories to visit
            while True:
                subdirs: list[str] = []
                with os.scandir(stack.fd) as it:
                    for entry in it:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        ident = (st.st_dev, st.st_ino)
                        if ident in seen:
                            continue
                        seen.add(ident)
                        size += st.st_blocks * 512
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
                pending.append(subdirs)
                entered = False
                while pending and not entered:
                    if not pending[-1]:
                        pending.pop()
                        if pending:
                            stack.pop()
                        continue
                    try:
                        stack.push(pending[-1].pop())
                        entered = True
                    except (FileNotFoundError, NotADirectoryError):
                        pass
                if not entered:
                    break
        finally:
            stack.close()
    finally:
        os.close(root_fd)
    return Usage(size=size, inodes=len(seen))
