"""Deletes that collect what they released before returning: containerd's
``SynchronousDelete``.

Deleting an image or a lease takes a root out of the garbage graph (see
:mod:`lamina.metadata.gc`): what only it kept is garbage from then on, which
``lamina gc`` collects — or the delete itself, with ``sync``, so the space is
free when it returns. A batch passes ``sync`` to its last delete only (as ``ctr
images rm --sync`` and ``ctr leases rm --sync`` do), so it is collected once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lamina.metadata.root import Root

__all__ = ["delete_image", "delete_lease"]


def delete_image(root: Root, name: str, *, sync: bool = False) -> None:
    """Delete the image record ``name`` (NotFound if none); with ``sync``, collect."""
    root.images().delete(name)
    if sync:
        _collect(root)


def delete_lease(root: Root, lease_id: str, *, sync: bool = False) -> None:
    """Delete the lease ``lease_id`` (NotFound if none); with ``sync``, collect."""
    root.leases().delete(lease_id)
    if sync:
        _collect(root)


def _collect(root: Root) -> None:
    # imported here: a delete without sync (image rm) does not pay GC's imports (startup)
    from lamina.metadata.gc import collect

    collect(root)
