"""What a ``lamina`` command works on: a local root, or a server at ``--address``.

A process resolves its backend once (:func:`open_backend`) and every command
goes through it, so no command can quietly work on the local root when the user
named a server. :class:`LocalBackend` opens the root with recovery
(:class:`~lamina.metadata.recover.RecoveredRoot`), lazily: a command that needs
no store opens none. :class:`ServerBackend` hands out the server's snapshotters,
content store and image records (:mod:`lamina.api.client`,
:mod:`lamina.api.images`); what only a local root has (container records,
leases, GC, check) it refuses with NotImplemented naming the command, before
anything is done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lamina.errors import NotImplementedErr

if TYPE_CHECKING:
    from lamina.api.images import RemoteImageStore
    from lamina.content import ContentStore
    from lamina.metadata.images import ImageRecords
    from lamina.metadata.recover import RecoveredRoot
    from lamina.snapshots import Snapshotter

__all__ = ["Backend", "LocalBackend", "ServerBackend", "open_backend"]

CALL_TIMEOUT = 600.0
"""Seconds a command waits for one call to the server (a Write stream excepted)."""
CONNECT_TIMEOUT = 10.0
"""Seconds a command waits for a server that accepted its connection to answer."""


class Backend(Protocol):
    """The stores one command works on."""

    def snapshotter(self, name: str) -> Snapshotter: ...

    def content(self) -> ContentStore: ...

    def images(self) -> ImageRecords: ...

    def delete_image(self, name: str, *, sync: bool = False) -> None:
        """Delete image ``name`` where the images are kept; with ``sync``, collect
        there what it alone kept (:mod:`lamina.metadata.deletes`)."""
        ...

    def root(self, command: str) -> RecoveredRoot:
        """The local root ``command`` needs; NotImplemented on a server."""
        ...

    @property
    def tmpmounts(self) -> Path | None:
        """Where temporary mounts go (None: the system's temporary directory)."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """The root at ``path``, opened with recovery on first use; ``opened`` is told
    of it then (the CLI says what the recovery repaired)."""

    def __init__(self, path: str, *,
                 opened: Callable[[RecoveredRoot], None] | None = None) -> None:
        self.path = path
        self._opened = opened
        self._root: RecoveredRoot | None = None
        self._lock = threading.Lock()

    def root(self, command: str = "") -> RecoveredRoot:
        with self._lock:
            if self._root is None:
                from lamina.metadata.recover import RecoveredRoot

                self._root = RecoveredRoot(self.path)
                if self._opened is not None:
                    self._opened(self._root)
            return self._root

    def snapshotter(self, name: str) -> Snapshotter:
        return self.root().snapshotter(name)

    def content(self) -> ContentStore:
        return self.root().content()

    def images(self) -> ImageRecords:
        return self.root().images()

    def delete_image(self, name: str, *, sync: bool = False) -> None:
        from lamina.metadata.deletes import delete_image

        delete_image(self.root(), name, sync=sync)

    @property
    def tmpmounts(self) -> Path | None:
        return self.root().tmpmounts

    def close(self) -> None:
        if self._root is not None:
            self._root.close()


class ServerBackend:
    """The server listening on ``address`` (no server there: Unavailable; one that
    does not answer within :data:`CONNECT_TIMEOUT`: Unavailable; each call bounded by
    :data:`CALL_TIMEOUT`)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._snapshotters: dict[str, Any] = {}
        self._content: Any = None
        self._images: RemoteImageStore | None = None
        self._lock = threading.Lock()

    def root(self, command: str) -> RecoveredRoot:
        what = command or "this command"
        raise NotImplementedErr(
            f"{what} works on a local root only, not through --address {self.address} "
            "(run it without --address, on the server's machine)")

    def snapshotter(self, name: str) -> Snapshotter:
        with self._lock:
            if name not in self._snapshotters:
                from lamina.api.client import RemoteSnapshotter

                self._snapshotters[name] = RemoteSnapshotter(
                    self.address, name, timeout=CALL_TIMEOUT, connect_timeout=CONNECT_TIMEOUT)
            sn: Snapshotter = self._snapshotters[name]
            return sn

    def content(self) -> ContentStore:
        with self._lock:
            if self._content is None:
                from lamina.api.client import RemoteContentStore

                self._content = RemoteContentStore(
                    self.address, timeout=CALL_TIMEOUT, connect_timeout=CONNECT_TIMEOUT)
            store: ContentStore = self._content
            return store

    def images(self) -> RemoteImageStore:
        with self._lock:
            if self._images is None:
                from lamina.api.images import RemoteImageStore

                self._images = RemoteImageStore(
                    self.address, timeout=CALL_TIMEOUT, connect_timeout=CONNECT_TIMEOUT)
            return self._images

    def delete_image(self, name: str, *, sync: bool = False) -> None:
        self.images().delete(name, sync=sync)

    @property
    def tmpmounts(self) -> Path | None:
        # the server's mounts are mounted here, beside no root of ours
        return None

    def close(self) -> None:
        for remote in (*self._snapshotters.values(), self._content, self._images):
            if remote is not None:
                remote.close()


def open_backend(*, root: str, address: str | None,
                 opened: Callable[[RecoveredRoot], None] | None = None) -> Backend:
    """The server at ``address`` when one is named, else the local root at ``root``
    (``opened``: see :class:`LocalBackend`)."""
    return ServerBackend(address) if address else LocalBackend(root, opened=opened)
