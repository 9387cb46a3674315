"""OCI whiteout names and overlayfs whiteout representations.

In an OCI layer a file named ``.wh.<name>`` deletes ``<name>`` from the
layers below, and a file named ``.wh..wh..opq`` in a directory hides
everything the lower layers had in that directory. overlayfs represents the
same things in an upper directory as a character device 0/0 named ``<name>``
and as the xattr ``trusted.overlay.opaque=y`` on the directory
(``user.overlay.opaque=y`` in a user namespace, mounted ``userxattr``).

overlayfs filters whiteouts out of a directory's listing only where it merges
the directory with a lower one: in a directory that is opaque or has no lower
counterpart, a whiteout is listed but cannot be opened. So a whiteout written
without seeing the lowers (staged extraction) is checked against them before
the layer is used (:func:`drop_needless_whiteouts`).
"""

from __future__ import annotations

import errno
import os
import stat

from lamina.errors import InvalidArgument
from lamina.fs.tree import DIR_FLAGS
from lamina.mounts.overlay import overlay_opaque_xattr

__all__ = [
    "OPAQUE_MARKER",
    "WHITEOUT_META_PREFIX",
    "WHITEOUT_PREFIX",
    "drop_needless_whiteouts",
    "is_overlay_whiteout",
    "whiteout_name",
    "whiteout_target",
]

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
# The overlay xattr names and mount options are the mounts layer's
# (lamina.mounts.overlay); they stay importable from here for the archive's users.


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


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, overlay_opaque_xattr()) == b"y"
    except OSError:
        return False


def _needed(upper_fd: int, lower_fd: int | None, parts: list[str]) -> bool:
    """Whether the whiteout device at ``parts`` in the upper directory hides a
    lower entry: its directory is merged with a lower directory (no ancestor
    below the root is opaque, every ancestor is a directory in the lowers too)
    and the lowers have the name."""
    if lower_fd is None:
        return False
    ufd, lfd = os.dup(upper_fd), os.dup(lower_fd)
    try:
        for comp in parts[:-1]:
            for which in ("upper", "lower"):
                cur = ufd if which == "upper" else lfd
                try:
                    nfd = os.open(comp, DIR_FLAGS, dir_fd=cur)
                except OSError:
                    return False  # not a directory there (or not there): no merge
                os.close(cur)
                if which == "upper":
                    ufd = nfd
                else:
                    lfd = nfd
            if _opaque(ufd):
                return False
        try:
            os.lstat(parts[-1], dir_fd=lfd)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(ufd)
        os.close(lfd)


def drop_needless_whiteouts(
    upper: str | os.PathLike[str], lower: str | os.PathLike[str] | None, paths: list[str]
) -> int:
    """Remove the whiteout devices at ``paths`` (relative, in the upper
    directory ``upper``) that hide nothing in ``lower`` (the lowers' merged
    tree, e.g. a mounted view; None: no lowers); returns how many went.

    A path that is no longer a whiteout device (the layer replaced it) is left
    alone. Paths are resolved without following symlinks.
    """
    removed = 0
    ufd = os.open(upper, DIR_FLAGS)
    lfd = os.open(lower, DIR_FLAGS) if lower is not None else None
    try:
        for rel in paths:
            parts = [p for p in rel.split("/") if p]
            if not parts or _needed(ufd, lfd, parts):
                continue
            dfd = os.dup(ufd)
            try:
                for comp in parts[:-1]:
                    nfd = os.open(comp, DIR_FLAGS, dir_fd=dfd)
                    os.close(dfd)
                    dfd = nfd
                st = os.lstat(parts[-1], dir_fd=dfd)
                if is_overlay_whiteout(st):
                    os.unlink(parts[-1], dir_fd=dfd)
                    removed += 1
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
            finally:
                os.close(dfd)
    finally:
        os.close(ufd)
        if lfd is not None:
            os.close(lfd)
    return removed
