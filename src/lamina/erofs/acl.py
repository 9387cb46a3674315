"""POSIX ACL xattrs as the kernel takes them from ``setxattr``.

A layer carries ACLs as ``system.posix_acl_access``/``_default`` xattrs in
the user-space form (a version-2 header, then 8-byte entries: tag, perm,
id). Setting one on a real file makes the kernel check it, fold an access
ACL equivalent to the mode bits into the mode (storing no xattr), and set
the group bits of the mode from the mask otherwise. The EROFS image holds
what a real file would then hold, so the mounted image equals an applied
layer.
"""

from __future__ import annotations

import stat
import struct

from lamina.errors import InvalidArgument

__all__ = ["acl_equivalent", "acl_mode", "acl_verdict"]

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF


def _entries(value: bytes) -> list[tuple[int, int, int]]:
    return [_ENTRY.unpack_from(value, off) for off in range(4, len(value), 8)]


def _valid(entries: list[tuple[int, int, int]]) -> bool:
    """posix_acl_valid: the tags in order, each perm rwx at most."""
    state, needs_mask = _USER_OBJ, False
    for tag, perm, _ in entries:
        if perm & ~7:
            return False
        if tag == _USER_OBJ and state == _USER_OBJ:
            state = _USER
        elif tag == _USER and state == _USER:
            needs_mask = True
        elif tag == _GROUP_OBJ and state == _USER:
            state = _GROUP
        elif tag == _GROUP and state == _GROUP:
            needs_mask = True
        elif tag == _MASK and state == _GROUP:
            state = _OTHER
        elif tag == _OTHER and (state == _OTHER or (state == _GROUP and not needs_mask)):
            state = 0
        else:
            return False
    return state == 0


def acl_verdict(kind: int, key: str, value: bytes, who: str) -> bytes | None:
    """The ACL xattr as stored (ids of the unnamed entries normalised), None
    when the kernel would store nothing, InvalidArgument when it refuses."""
    if kind == stat.S_IFLNK:
        return None  # EOPNOTSUPP
    rejected = InvalidArgument(f"invalid tar layer: {who}: the kernel rejects xattr {key!r} "
                               f"({len(value)}-byte value) on it")
    if len(value) < 4 or (len(value) - 4) % 8:
        raise rejected
    if _HEADER.unpack_from(value)[0] != _VERSION:
        return None  # EOPNOTSUPP
    entries = _entries(value)
    if not entries:
        return None  # an empty ACL removes one: nothing is stored
    if not _valid(entries):
        raise rejected
    if key.endswith("_default") and kind != stat.S_IFDIR:
        raise InvalidArgument(f"invalid tar layer: {who}: a default ACL on a file that "
                              "is not a directory (the kernel refuses it)")
    out = [_HEADER.pack(_VERSION)]
    for tag, perm, ident in entries:
        out.append(_ENTRY.pack(tag, perm, ident if tag in (_USER, _GROUP) else _UNDEFINED_ID))
    return b"".join(out)


def acl_mode(mode: int, value: bytes) -> int:
    """The mode after setting the access ACL ``value`` (posix_acl_update_mode)."""
    bits = 0
    mask = None
    for tag, perm, _ in _entries(value):
        if tag == _USER_OBJ:
            bits |= (perm & 7) << 6
        elif tag == _GROUP_OBJ:
            bits |= (perm & 7) << 3
        elif tag == _OTHER:
            bits |= perm & 7
        elif tag == _MASK:
            mask = perm & 7
    if mask is not None:
        bits = (bits & ~0o070) | (mask << 3)
    return (mode & ~0o777) | bits


def acl_equivalent(value: bytes) -> bool:
    """Whether the access ACL says no more than the mode bits (nothing stored)."""
    return all(tag in (_USER_OBJ, _GROUP_OBJ, _OTHER) for tag, _, _ in _entries(value))
