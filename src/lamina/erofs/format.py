"""The EROFS on-disk format: constants and struct layouts.

Names follow the kernel's ``fs/erofs/erofs_fs.h`` and
``Documentation/filesystems/erofs.rst``. Everything is little-endian. What
lamina writes is the uncompressed subset every EROFS reader knows (Linux 5.4
on, erofs-utils 1.5 on):

* the superblock, 128 bytes at byte :data:`EROFS_SUPER_OFFSET` of block 0;
* inodes in the metadata area starting at block ``meta_blkaddr``, each
  aligned to :data:`EROFS_ISLOTSIZE` bytes; an inode's *nid* is its offset
  from the start of that area divided by the slot size;
* compact (32-byte) inodes, whose times are the superblock's
  ``epoch``/``fixed_nsec``, and extended (64-byte) inodes;
* data layouts FLAT_PLAIN (``i_size`` bytes in consecutive blocks from
  ``startblk_lo``) and FLAT_INLINE (the whole blocks there, the tail right
  after the inode and its xattrs, within the same block);
* directories as blocks of 12-byte dirents, sorted by name, ``.`` and ``..``
  included, each block's names after its dirents;
* inline xattrs after the inode: an ibody header (with the ids of shared
  xattrs), then entries whose names are a prefix index plus a suffix.
"""

from __future__ import annotations

import stat
import struct

__all__ = [
    "DIRENT",
    "EROFS_BLKSIZ",
    "EROFS_BLKSIZBITS",
    "EROFS_FT",
    "EROFS_INODE_CHUNK_BASED",
    "EROFS_INODE_FLAT_INLINE",
    "EROFS_INODE_FLAT_PLAIN",
    "EROFS_INODE_LAYOUT_COMPACT",
    "EROFS_INODE_LAYOUT_EXTENDED",
    "EROFS_ISLOTSIZE",
    "EROFS_I_DATALAYOUT_BIT",
    "EROFS_I_VERSION_BIT",
    "EROFS_NAME_LEN",
    "EROFS_SUPER_MAGIC_V1",
    "EROFS_SUPER_OFFSET",
    "EROFS_XATTR_INDEX_POSIX_ACL_ACCESS",
    "EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT",
    "EROFS_XATTR_INDEX_SECURITY",
    "EROFS_XATTR_INDEX_TRUSTED",
    "EROFS_XATTR_INDEX_USER",
    "INODE_COMPACT",
    "INODE_EXTENDED",
    "SUPER_BLOCK",
    "XATTR_ENTRY",
    "XATTR_IBODY_HEADER",
    "XATTR_PREFIXES",
    "i_format",
    "split_xattr_name",
    "xattr_entry_size",
    "xattr_full_name",
]

EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC_V1 = 0xE0F5E1E2
EROFS_BLKSIZBITS = 12
EROFS_BLKSIZ = 1 << EROFS_BLKSIZBITS
EROFS_ISLOTSIZE = 32
EROFS_NAME_LEN = 255

EROFS_FEATURE_COMPAT_SB_CHKSUM = 0x1
EROFS_FEATURE_INCOMPAT_CHUNKED_FILE = 0x4

# i_format: bit 0 the inode version (layout), bits 1-3 the data layout
EROFS_I_VERSION_BIT = 0
EROFS_I_DATALAYOUT_BIT = 1
EROFS_INODE_LAYOUT_COMPACT = 0
EROFS_INODE_LAYOUT_EXTENDED = 1
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_CHUNK_BASED = 4


def _layout(fmt: str, size: int) -> struct.Struct:
    """``fmt`` as a Struct, checked against the size the kernel's struct has."""
    layout = struct.Struct(fmt)
    if layout.size != size:
        raise AssertionError(f"struct {fmt!r} is {layout.size} bytes, the kernel's {size}")
    return layout


#: struct erofs_super_block (the 128 bytes every version has):
#: magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos,
#: epoch (build_time), fixed_nsec (build_time_nsec), blocks, meta_blkaddr,
#: xattr_blkaddr, uuid, volume_name, feature_incompat, available_compr_algs,
#: extra_devices, devt_slotoff, dirblkbits, xattr_prefix_count,
#: xattr_prefix_start, packed_nid, xattr_filter_reserved, reserved
SUPER_BLOCK = _layout("<IIIBBHQQIIII16s16sIHHHBBIQB23s", 128)

#: struct erofs_inode_compact: i_format, i_xattr_icount, i_mode, i_nlink,
#: i_size, i_mtime (0: the epoch), i_u (startblk_lo / rdev), i_ino, i_uid,
#: i_gid, i_reserved
INODE_COMPACT = _layout("<HHHHIIIIHHI", 32)

#: struct erofs_inode_extended: i_format, i_xattr_icount, i_mode, i_nb
#: (reserved here), i_size, i_u, i_ino, i_uid, i_gid, i_mtime,
#: i_mtime_nsec, i_nlink, i_reserved2
INODE_EXTENDED = _layout("<HHHHQIIIIQII16s", 64)

#: struct erofs_dirent: nid, nameoff, file_type, reserved
DIRENT = _layout("<QHBB", 12)

#: struct erofs_xattr_ibody_header: h_name_filter (h_reserved),
#: h_shared_count, h_reserved2; then h_shared_count 4-byte shared xattr ids
XATTR_IBODY_HEADER = _layout("<IB7s", 12)

#: struct erofs_xattr_entry: e_name_len, e_name_index, e_value_size; then
#: the name suffix and the value, the whole padded to 4 bytes
XATTR_ENTRY = _layout("<BBH", 4)

EROFS_XATTR_INDEX_USER = 1
EROFS_XATTR_INDEX_POSIX_ACL_ACCESS = 2
EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT = 3
EROFS_XATTR_INDEX_TRUSTED = 4
EROFS_XATTR_INDEX_SECURITY = 6

#: full-name prefix -> name index; the two ACL names are whole names
XATTR_PREFIXES: dict[str, int] = {
    "user.": EROFS_XATTR_INDEX_USER,
    "trusted.": EROFS_XATTR_INDEX_TRUSTED,
    "security.": EROFS_XATTR_INDEX_SECURITY,
}
_ACL_NAMES = {
    "system.posix_acl_access": EROFS_XATTR_INDEX_POSIX_ACL_ACCESS,
    "system.posix_acl_default": EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT,
}
_INDEX_PREFIX = {v: k for k, v in XATTR_PREFIXES.items()} | {v: k for k, v in _ACL_NAMES.items()}

#: file_type of a dirent, by the inode's S_IFMT
EROFS_FT: dict[int, int] = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}


def i_format(layout: int, datalayout: int) -> int:
    """The ``i_format`` field of an inode."""
    return (layout << EROFS_I_VERSION_BIT) | (datalayout << EROFS_I_DATALAYOUT_BIT)


def split_xattr_name(name: str) -> tuple[int, bytes] | None:
    """``(e_name_index, suffix)`` for a full xattr name; None when EROFS has no
    prefix for it (the kernel would not store it on any filesystem either)."""
    index = _ACL_NAMES.get(name)
    if index is not None:
        return index, b""
    for prefix, index in XATTR_PREFIXES.items():
        if name.startswith(prefix):
            return index, name[len(prefix):].encode("utf-8", "surrogateescape")
    return None


def xattr_full_name(index: int, suffix: bytes) -> str | None:
    """The full xattr name of an entry; None for an index lamina does not know."""
    prefix = _INDEX_PREFIX.get(index)
    if prefix is None:
        return None
    return prefix + suffix.decode("utf-8", "surrogateescape")


def xattr_entry_size(name_len: int, value_len: int) -> int:
    """Bytes one xattr entry takes, padding included."""
    return (XATTR_ENTRY.size + name_len + value_len + 3) & ~3
