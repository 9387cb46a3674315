"""The records a layer's tree is made of: one :class:`Inode` per file (shared
by its hard links; a directory's holds its entries), and the root's metadata
when the layer does not list its root (:class:`RootMeta`)."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

__all__ = ["Inode", "RootMeta", "new_dir"]


@dataclass(frozen=True)
class RootMeta:
    """The root directory's metadata when the layer does not list its root
    (in an overlay stack the topmost layer's root is what a mount shows, so a
    layer takes its parent's)."""

    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(slots=True, eq=False)
class Inode:
    """One file of the image. ``data`` is where a regular file's bytes are
    (set by the writer), ``target`` a symlink's, ``rdev`` a device's;
    directories have ``children`` and, while attached, ``parent``/``name``."""

    kind: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None  # None: the image's build time (made by lamina, not listed)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    size: int = 0
    data: object = None
    tail_in_data: bool = False  # the writer put the last partial block with the rest
    tail_at: int = -1  # else where the writer keeps it aside (its spool offset)
    target: bytes = b""
    rdev: int = 0
    children: dict[str, Inode] | None = None
    parent: Inode | None = None
    name: str = ""
    depth: int = 0
    rel: str = ""  # a directory's path from the root, where it was attached
    plen: int = 0  # bytes of that path
    # symlinks met as a parent: where the target led, valid while ``epoch`` holds
    resolved: Inode | None = None
    epoch: int = -1
    hops: int = 0


def new_dir(mode: int, uid: int, gid: int, mtime_ns: int | None) -> Inode:
    return Inode(stat.S_IFDIR, mode, uid, gid, mtime_ns, children={})
