"""Every cap lamina puts on a layer, in one place, with the reason for its value.

A layer is data from whoever built the image. What it may contain is bounded
so that a hostile one fails early with a one-line error instead of a
traceback, a full disk or an unusable tree. Values that no real filesystem or
kernel interface could hold are :class:`~lamina.errors.InvalidArgument`
(checked per member in O(1) by :mod:`lamina.archive.tarstream`, before
anything of that member is written); growth past a size or space budget is
:class:`~lamina.errors.ResourceExhausted` (checked while streaming, by
:mod:`lamina.archive.compression` and :func:`lamina.archive.apply.apply_layer`).

=====================  ==========================  ====================================
what                   cap                         why
=====================  ==========================  ====================================
member name            4096 bytes, 255 per         Linux PATH_MAX / NAME_MAX
                       component
link target            4096 bytes                  PATH_MAX (symlink bodies, link names)
nesting depth          2048 directories, after     the deepest a 4096-byte name reaches;
                       symlinked parents resolved  symlinks cannot take a tree deeper
device numbers         major < 4096,               what Linux's dev_t (12+20 bits) holds
                       minor < 1048576
owner                  uid/gid < 4294967295        2**32-1 is chown's "leave unchanged"
mode                   0 .. 0o177777               permission, setuid/gid/sticky and
                                                   file-type bits; nothing else exists
times                  |seconds| < 2**63           time_t, and what Go's archive/tar
                                                   (containerd) accepts; the kernel
                                                   clamps to the filesystem's range
xattrs per member      128, each value <= 64 KiB,  XATTR_SIZE_MAX / XATTR_NAME_MAX;
                       name <= 255 bytes,          ext4 holds one block, XFS 64 KiB
                       1 MiB names+values in all   per value: 128 is far above use
metadata per member    1 MiB (PAX headers, GNU     bounds memory per member
                       long names, in total)
members per layer      2,097,152                   memory grows with them (an EROFS
                                                   layer's tree is built in memory:
                                                   about 650 bytes each); ten times a
                                                   full distribution's files
layer size             64 GiB uncompressed by      stops decompression bombs early;
                       default (``max_size``,      raise it for huge layers
                       ``--max-layer-size``,
                       ``$LAMINA_MAX_LAYER_SIZE``)
free space             stop when less than         the disk never fills: lamina's own
                       min(64 MiB, 1/32 of the     metadata and other users keep room;
                       filesystem) is left for     blocks reserved for root stay free
                       unprivileged users
=====================  ==========================  ====================================
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable

from lamina.errors import InvalidArgument, ResourceExhausted

__all__ = [
    "DEFAULT_MAX_LAYER_SIZE",
    "MAX_DEPTH",
    "MAX_DEVMAJOR",
    "MAX_DEVMINOR",
    "MAX_ID",
    "MAX_MEMBERS",
    "MAX_MODE",
    "MAX_NAME_COMPONENT",
    "MAX_PATH",
    "MAX_TIME_S",
    "MAX_XATTRS",
    "MAX_XATTR_NAME",
    "MAX_XATTR_TOTAL",
    "MAX_XATTR_VALUE",
    "SPACE_CHECK_EVERY",
    "LayerMeter",
    "SpaceGuard",
    "check_fits",
    "env_max_layer_size",
    "parse_size",
    "space_reserve",
]

MAX_PATH = 4096
MAX_NAME_COMPONENT = 255
MAX_DEPTH = 2048
MAX_DEVMAJOR = (1 << 12) - 1
MAX_DEVMINOR = (1 << 20) - 1
MAX_ID = (1 << 32) - 2
MAX_MODE = 0o177777
MAX_TIME_S = (1 << 63) - 1
MAX_XATTRS = 128
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 << 10
MAX_XATTR_TOTAL = 1 << 20
#: members of one layer (ResourceExhausted past it: a budget, see the table)
MAX_MEMBERS = 1 << 21

DEFAULT_MAX_LAYER_SIZE = 64 << 30
#: Uncompressed bytes between two free-space checks while applying a layer.
SPACE_CHECK_EVERY = 16 << 20
_RESERVE_CAP = 64 << 20
ENV_MAX_LAYER_SIZE = "LAMINA_MAX_LAYER_SIZE"

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"(\d+)\s*([kmgtp]?)(?:i?b)?", re.IGNORECASE)


def space_reserve(total_bytes: int) -> int:
    """Bytes an apply leaves free on a filesystem of ``total_bytes``."""
    return min(_RESERVE_CAP, total_bytes // 32)


def check_fits(path: str | os.PathLike[str], need: int, what: str) -> None:
    """ResourceExhausted now unless ``need`` more bytes fit on the filesystem of
    ``path`` with its :func:`space_reserve` left (``what`` announce them)."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    reserve = space_reserve(st.f_blocks * st.f_frsize)
    if need > free - reserve:
        raise ResourceExhausted(
            f"{what} announce {need} bytes, {free} bytes are free on the filesystem "
            f"of {os.fspath(path)} (lamina keeps {reserve} free)")


def parse_size(text: str, what: str = "size") -> int:
    """``"64G"``, ``"512MiB"``, ``"1048576"`` (binary units) as a positive byte count."""
    m = _SIZE.fullmatch(text.strip())
    value = int(m.group(1)) * _UNITS[m.group(2).lower()] if m else 0
    if value <= 0:
        raise InvalidArgument(f"{what} {text!r} is not a positive size (e.g. 64G, 512M, 1048576)")
    return value


def env_max_layer_size() -> int:
    """The layer size cap: ``$LAMINA_MAX_LAYER_SIZE`` if set, else the default."""
    text = os.environ.get(ENV_MAX_LAYER_SIZE)
    if not text:
        return DEFAULT_MAX_LAYER_SIZE
    return parse_size(text, f"${ENV_MAX_LAYER_SIZE}")


class SpaceGuard:
    """Keeps a layer apply from filling the filesystem that holds directory ``fd``.

    :meth:`check` raises ResourceExhausted when the space left to unprivileged
    users drops below :func:`space_reserve` (or free inodes below 1/32 of
    them, at most 4096); :meth:`seen` calls it every
    :data:`SPACE_CHECK_EVERY` bytes of layer read (half the reserve on a small
    filesystem, at least 1 MiB), so the cost is one ``fstatvfs`` per 16 MiB.
    :meth:`explain` turns an ENOSPC/EDQUOT that still happens between two
    checks into the same one-line error.
    """

    def __init__(self, fd: int, where: str, *, action: str = "apply layer") -> None:
        """``action`` begins the error messages (what was stopped)."""
        st = os.fstatvfs(fd)
        self.reserve = space_reserve(st.f_blocks * st.f_frsize)
        self.inode_reserve = min(4096, st.f_files // 32)
        self._fd = fd
        self._where = where
        self._action = action
        # often enough that the reserve is not crossed between two checks
        self._every = max(1 << 20, min(SPACE_CHECK_EVERY, self.reserve // 2))
        self._next = self._every

    def seen(self, total: int) -> None:
        """``total`` bytes of the layer were read so far."""
        if total >= self._next:
            self._next = total + self._every
            self.check()

    def _short(self) -> str | None:
        st = os.fstatvfs(self._fd)
        free = st.f_bavail * st.f_frsize
        if free < self.reserve:
            return (f"{free} bytes left on the filesystem of {self._where} "
                    f"(lamina keeps {self.reserve} free)")
        if st.f_files and st.f_favail < self.inode_reserve:
            return (f"{st.f_favail} inodes left on the filesystem of {self._where} "
                    f"(lamina keeps {self.inode_reserve} free)")
        return None

    def check(self) -> None:
        """Raise ResourceExhausted if the filesystem is below its reserve."""
        short = self._short()
        if short is not None:
            raise ResourceExhausted(f"{self._action}: {short}")

    def explain(self, exc: OSError, member: str, has_xattrs: bool) -> Exception:
        """The error an ENOSPC/EDQUOT at ``member`` stands for."""
        if exc.errno == errno.EDQUOT:
            return ResourceExhausted(f"{self._action} at {member}: disk quota exceeded "
                                     f"on the filesystem of {self._where}")
        short = self._short()
        if short is None and has_xattrs:
            # space is left: the filesystem cannot hold this member's xattrs (ext4: one block)
            return InvalidArgument(f"invalid tar layer: {member}: its xattrs do not fit "
                                   f"on the filesystem of {self._where}")
        return ResourceExhausted(f"{self._action} at {member}: "
                                 f"{short or 'no space left on the filesystem of ' + self._where}")


class LayerMeter:
    """Called with each run of a layer's uncompressed bytes as they are read
    (a :class:`~lamina.archive.tarstream.TarReader`'s callback): hashes them for
    the DiffID, has ``space`` check the free space on the way, and tells
    ``progress`` how many bytes were read so far."""

    def __init__(self, space: SpaceGuard, progress: Callable[[int], None] | None) -> None:
        import hashlib  # here: the image commands import this module for its limits

        self.digest = hashlib.sha256()
        self.count = 0
        self._space = space
        self._progress = progress

    def __call__(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)
        self._space.seen(self.count)
        if self._progress is not None:
            self._progress(self.count)

    @property
    def diff_id(self) -> str:
        """The DiffID of the bytes read so far."""
        return "sha256:" + self.digest.hexdigest()

    def verified(self, expected: str | None) -> str:
        """:attr:`diff_id`, the whole layer read; InvalidArgument when ``expected``
        is given and is another."""
        diff_id = self.diff_id
        if expected is not None and expected != diff_id:
            raise InvalidArgument(f"diff id mismatch: layer has {diff_id}, expected {expected}")
        return diff_id
