"""A lamina root: where every store of one installation lives on disk.

Layout under the root directory::

    snapshots/<snapshotter>/   one directory per snapshotter (metadata.db, snapshots/<id>/)
    content/                   the content store (blobs/sha256/<hex>, ingest/, metadata.db)
    metadata.db                images, containers, leases
    tmpmounts/                 temporary mount points
    locks/                     lock files (unpack, gc, checkpoints, containers)
    tasks/                     running tasks' bundles (see lamina.containers.runtime.bundle)

Everything in it is owner-only (see :mod:`lamina.fs.perms`): the root is 0700, as
containerd keeps its own, and a root an earlier lamina left 0711 is tightened
when it is opened.

Opening a :class:`Root` is a plain open, as containerd's ``metadata.NewDB`` is:
it makes a new root (stamped with the current format) and refuses one at any
other format, and it repairs nothing. Migrating an older format and repairing a
root a machine restart interrupted is recovery, its own step, which a process
takes once before it works on the root: :class:`lamina.metadata.recover.RecoveredRoot`
(every ``lamina`` command and ``lamina serve`` open the root through it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lamina import rootless
from lamina.errors import InvalidArgument
from lamina.fs.perms import DIR_MODE, tighten
from lamina.metadata.formats import check_format

if TYPE_CHECKING:
    from lamina.content import ContentStore
    from lamina.metadata.containers import ContainerStore
    from lamina.metadata.images import ImageStore
    from lamina.metadata.leases import LeaseManager
    from lamina.snapshots import Snapshotter

__all__ = ["DEFAULT_ROOT", "SNAPSHOTTERS", "Root", "check_snapshotter", "default_root",
           "make_root_dir"]

DEFAULT_ROOT = "/var/lib/lamina"


def default_root() -> str:
    """``$LAMINA_ROOT``, else /var/lib/lamina for root, else a per-user directory:
    ``$XDG_DATA_HOME/lamina`` or ``~/.local/share/lamina`` (also rootless, where
    lamina is root only in its own user namespace: see :mod:`lamina.rootless`)."""
    env = os.environ.get("LAMINA_ROOT")
    if env:
        return env
    if os.geteuid() == 0 and not rootless.active():
        return DEFAULT_ROOT
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(data, "lamina")


def _overlay(path: Path, *, async_remove: bool = False, ahead: int = 0) -> Snapshotter:
    from lamina.snapshots.overlay import OverlaySnapshotter

    return OverlaySnapshotter(path, async_remove=async_remove, ahead=ahead)


def _native(path: Path, *, async_remove: bool = False, ahead: int = 0) -> Snapshotter:
    from lamina.snapshots.native import NativeSnapshotter

    return NativeSnapshotter(path, async_remove=async_remove, ahead=ahead)


def _erofs(path: Path, *, async_remove: bool = False, ahead: int = 0) -> Snapshotter:
    from lamina.snapshots.erofs import ErofsSnapshotter

    # none made ahead: a parent's layer is mounted by filling a new directory
    return ErofsSnapshotter(path, async_remove=async_remove)


_Store = TypeVar("_Store")

SNAPSHOTTERS: dict[str, Callable[..., Snapshotter]] = {
    "overlay": _overlay,
    "native": _native,
    "erofs": _erofs,
}


def check_snapshotter(name: str) -> str:
    """``name`` when lamina has a snapshotter so called; InvalidArgument if not."""
    if name not in SNAPSHOTTERS:
        known = ", ".join(sorted(SNAPSHOTTERS))
        raise InvalidArgument(f"unknown snapshotter {name!r} (known: {known})")
    return name


def make_root_dir(path: Path) -> None:
    """Make the root directory at ``path`` (owner-only, tightened if an earlier lamina
    left it open) and its lock directory, if missing."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    tighten(path)
    (path / "locks").mkdir(mode=DIR_MODE, exist_ok=True)


class Root:
    """Paths of one lamina root, and the stores opened on it (lazily, once)."""

    def __init__(self, path: str | os.PathLike[str], *, async_remove: bool = False,
                 ahead: int = 0) -> None:
        """``async_remove``: snapshotters delete removed snapshots' directories in a
        background thread (what a long-running server wants) instead of inline.
        ``ahead``: how many directories each snapshotter keeps made ahead for
        prepares (:mod:`lamina.snapshots.ahead`: what a server under churn wants).

        A plain open (see the module docs): FailedPrecondition for a root at another
        format than this lamina's; :attr:`format_found` is the format it had."""
        self.path = Path(path)
        self.async_remove = async_remove
        self.ahead = ahead
        make_root_dir(self.path)
        self._lock = threading.RLock()
        self._stores: dict[str, Any] = {}  # by name, in the order they were opened
        self.format_found = check_format(self.path)

    def snapshots_dir(self, snapshotter: str) -> Path:
        return self.path / "snapshots" / snapshotter

    @property
    def content_dir(self) -> Path:
        return self.path / "content"

    @property
    def metadata_path(self) -> Path:
        return self.path / "metadata.db"

    @property
    def tmpmounts(self) -> Path:
        return self.path / "tmpmounts"

    def snapshotter_names(self) -> list[str]:
        """Snapshotters that have state on this root (a subset of :data:`SNAPSHOTTERS`)."""
        base = self.path / "snapshots"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and p.name in SNAPSHOTTERS)

    def _once(self, name: str, open_store: Callable[[], _Store]) -> _Store:
        """The store called ``name``, opened by ``open_store`` the first time."""
        with self._lock:
            if name not in self._stores:
                self._stores[name] = open_store()
            store: _Store = self._stores[name]
            return store

    def snapshotter(self, name: str) -> Snapshotter:
        """The snapshotter ``name`` on this root (opened once)."""
        factory = SNAPSHOTTERS[check_snapshotter(name)]
        return self._once(f"snapshots/{name}", lambda: factory(
            self.snapshots_dir(name), async_remove=self.async_remove, ahead=self.ahead))

    def content(self) -> ContentStore:
        """The local content store on this root (opened once)."""
        from lamina.content.local import LocalContentStore

        return self._once("content", lambda: LocalContentStore(self.content_dir))

    def images(self) -> ImageStore:
        """The image store (opened once)."""
        from lamina.metadata.images import ImageStore

        return self._once("images", lambda: ImageStore(self.metadata_path))

    def containers(self) -> ContainerStore:
        """The container records (opened once)."""
        from lamina.metadata.containers import ContainerStore

        return self._once("containers", lambda: ContainerStore(self.metadata_path))

    def leases(self) -> LeaseManager:
        """The lease manager (opened once)."""
        from lamina.metadata.leases import LeaseManager

        return self._once("leases", lambda: LeaseManager(self.metadata_path))

    def close(self) -> None:
        """Close every store opened on this root; calling it twice is fine."""
        with self._lock:
            stores = list(self._stores.values())
            self._stores.clear()
        for store in stores:
            store.close()
