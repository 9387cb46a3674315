"""The mount table of this process: ``/proc/self/mountinfo``, parsed in one place.

Each line is (proc(5)): mount id, parent id, ``major:minor``, the root of the
mount within its filesystem, the mount point, per-mount options, optional
fields ended by ``-``, the filesystem type, the source, and the superblock
options. Paths escape space, tab, newline and backslash as ``\\ooo`` octal;
they are unescaped here, as bytes, then decoded the way Python decodes file
names, so any name round-trips.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["MountEntry", "read_mountinfo"]

_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(raw: bytes) -> str:
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m[1], 8)]), raw))


@dataclass(frozen=True)
class MountEntry:
    """One mount."""

    mount_id: int
    parent_id: int
    device: str
    root: str
    mount_point: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    def super_option(self, name: str) -> list[str]:
        """Values of superblock option ``name`` (overlay's ``lowerdir``, ...)."""
        prefix = name + "="
        return [o[len(prefix):] for o in self.super_options if o.startswith(prefix)]


def _parse(line: bytes) -> MountEntry | None:
    parts = line.split()
    try:
        sep = parts.index(b"-", 6)
    except ValueError:
        return None
    if len(parts) < sep + 3 or len(parts) < 6:
        return None
    try:
        mount_id, parent_id = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return MountEntry(
        mount_id=mount_id,
        parent_id=parent_id,
        device=parts[2].decode("ascii", "replace"),
        root=_unescape(parts[3]),
        mount_point=_unescape(parts[4]),
        options=tuple(_unescape(parts[5]).split(",")),
        fstype=_unescape(parts[sep + 1]),
        source=_unescape(parts[sep + 2]),
        super_options=tuple(_unescape(parts[sep + 3]).split(",")) if len(parts) > sep + 3
        else (),
    )


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount of this process's mount namespace, in the kernel's order."""
    with open(path, "rb") as f:
        data = f.read()
    return [e for line in data.splitlines() if (e := _parse(line)) is not None]
