"""What an overlay mount of layers needs in this process's user namespace.

overlayfs keeps its own state (whiteouts' opaque markers, redirects) in
xattrs named ``trusted.overlay.*``. ``trusted.`` belongs to the initial user
namespace's root, so in a user namespace (rootless lamina) overlayfs is
mounted with ``userxattr`` and uses ``user.overlay.*`` instead. The
snapshotter and the ID-mapped copy mount with :data:`OVERLAY_MOUNT_OPTIONS`;
the archive layer reads and writes opaque markers under
:data:`OVERLAY_XATTR_PREFIX`.
"""

from __future__ import annotations

from lamina.rootless import in_user_namespace

__all__ = ["OVERLAY_MOUNT_OPTIONS", "OVERLAY_OPAQUE_XATTR", "OVERLAY_XATTR_PREFIX"]

_USERNS = in_user_namespace()
OVERLAY_XATTR_PREFIX = "user.overlay." if _USERNS else "trusted.overlay."
OVERLAY_OPAQUE_XATTR = OVERLAY_XATTR_PREFIX + "opaque"
OVERLAY_MOUNT_OPTIONS: tuple[str, ...] = ("userxattr",) if _USERNS else ()
"""What every overlay mount of layers needs here (``userxattr`` in a user namespace)."""
