"""Which xattrs a file keeps: what Linux stores when a layer's xattr is set
on a fresh file as root (ext4, tmpfs), so the image holds what an applied
layer holds."""

from __future__ import annotations

import stat

from lamina.erofs.acl import acl_verdict
from lamina.errors import InvalidArgument
from lamina.mounts.overlay import overlay_xattr_prefix

__all__ = ["xattr_verdict"]


def _bad(msg: str) -> InvalidArgument:
    return InvalidArgument(f"invalid tar layer: {msg}")


def xattr_verdict(kind: int, key: str, value: bytes, who: str) -> bytes | None:
    """What setting ``key`` on a fresh file of type ``kind`` as root leaves
    stored: the value (possibly normalised, as the kernel does), or None when
    the kernel refuses it quietly (EOPNOTSUPP, EPERM: apply_layer skips
    those); InvalidArgument where it answers EINVAL (apply_layer's refusal)."""
    if key.startswith(overlay_xattr_prefix()):
        return None
    for prefix in ("user.", "trusted.", "security."):
        if key.startswith(prefix):
            if prefix == "user." and kind not in (stat.S_IFREG, stat.S_IFDIR):
                return None
            if key == prefix:
                raise _bad(f"{who}: the kernel rejects xattr {key!r} "
                           f"({len(value)}-byte value) on it")
            if key == "security.capability":
                return _capability(value, key, who)
            return value
    if key in ("system.posix_acl_access", "system.posix_acl_default"):
        return acl_verdict(kind, key, value, who)
    return None


def _capability(value: bytes, key: str, who: str) -> bytes:
    """A VFS capability as the kernel stores it (cap_convert_nscap)."""
    magic = int.from_bytes(value[:4], "little") if len(value) >= 4 else -1
    if len(value) == 20 and magic & ~1 == 0x02000000:
        return value
    if len(value) == 24 and magic & ~1 == 0x03000000:
        return (0x03000000 | (magic & 1)).to_bytes(4, "little") + value[4:]
    raise _bad(f"{who}: the kernel rejects xattr {key!r} ({len(value)}-byte value) on it")
