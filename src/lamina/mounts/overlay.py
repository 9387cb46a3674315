"""What an overlay mount of layers needs in this process's user namespace.

overlayfs keeps its own state (whiteouts' opaque markers, redirects) in
xattrs named ``trusted.overlay.*``. ``trusted.`` belongs to the initial user
namespace's root, so in a user namespace (rootless lamina) overlayfs is
mounted with ``userxattr`` and uses ``user.overlay.*`` instead. The
snapshotter and the ID-mapped copy mount with :func:`overlay_mount_options`;
the archive layer reads and writes opaque markers under
:func:`overlay_xattr_prefix`.

Each is asked of the process as it is when called, not when lamina was
imported: a process joins lamina's namespace (:func:`lamina.rootless.enter`)
after its imports, and the answer must follow it.
"""

from __future__ import annotations

from lamina.rootless import in_user_namespace

__all__ = ["overlay_mount_options", "overlay_opaque_xattr", "overlay_xattr_prefix"]


def overlay_xattr_prefix() -> str:
    """``user.overlay.`` in a user namespace, else ``trusted.overlay.``."""
    return "user.overlay." if in_user_namespace() else "trusted.overlay."


def overlay_opaque_xattr() -> str:
    """The xattr that marks an overlay directory opaque here."""
    return overlay_xattr_prefix() + "opaque"


def overlay_mount_options() -> tuple[str, ...]:
    """What every overlay mount of layers needs here (``userxattr`` in a user
    namespace)."""
    return ("userxattr",) if in_user_namespace() else ()
