"""One containerd namespace's snapshots, read-only: what ``lamina -n NAMESPACE`` shows.

containerd's metadata snapshotter keys what it creates through ``lamina serve``
``<namespace>/<n>/<key>`` (:func:`lamina.owners.looks_like_containerd_key`); those
snapshots are containerd's, and the CLI never changes them. lamina's own
objects live in namespace ``default`` and are not keyed so. A
:class:`NamespaceView` shows the snapshots of one containerd namespace, as
``ctr -n NAMESPACE snapshots ls`` would list them, and refuses every change
with FailedPrecondition, the class the CLI gives any change to containerd's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from lamina.errors import FailedPrecondition, NotFound
from lamina.mounts.mount import Mount
from lamina.owners import (
    CONTAINERD,
    DEFAULT_NAMESPACE,
    looks_like_containerd_key,
)
from lamina.snapshots import Capability, Info, Snapshotter, Usage

__all__ = ["NamespaceView"]


class NamespaceView:
    """The snapshots of ``sn`` that containerd keeps in ``namespace``, read-only."""

    def __init__(self, sn: Snapshotter, namespace: str) -> None:
        self.sn = sn
        self.namespace = namespace
        self._prefix = f"{namespace}/"

    def _theirs(self, key: str, owners: Mapping[str, str] | None) -> bool:
        if not (key.startswith(self._prefix) and looks_like_containerd_key(key)):
            return False
        return owners is None or owners.get(key) == CONTAINERD

    def _all_owners(self) -> dict[str, str] | None:
        owners = getattr(self.sn, "owners", None)  # unknown through --address
        return owners() if callable(owners) else None

    def owners(self) -> dict[str, str]:
        """The owner of every snapshot this view sees (containerd), by key."""
        return {i.name: CONTAINERD for i in self.walk()}

    def _seen(self, key: str) -> str:
        if not self._theirs(key, self._all_owners()):
            raise NotFound(f"snapshot {key!r} is not in containerd namespace "
                           f"{self.namespace!r}")
        return key

    def _refuse(self, key: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"{key}: namespace {self.namespace!r} is containerd's; lamina shows it "
            f"read-only (lamina's own snapshots are in namespace {DEFAULT_NAMESPACE!r})")

    @property
    def capabilities(self) -> frozenset[Capability]:
        return self.sn.capabilities

    def stat(self, key: str) -> Info:
        return self.sn.stat(self._seen(key))

    def usage(self, key: str) -> Usage:
        return self.sn.usage(self._seen(key))

    def mounts(self, key: str) -> list[Mount]:
        return self.sn.mounts(self._seen(key))

    def walk(self, *filters: str) -> Iterator[Info]:
        owners = self._all_owners()
        return (i for i in self.sn.walk(*filters) if self._theirs(i.name, owners))

    def update(self, info: Info, *fieldpaths: str) -> Info:
        raise self._refuse(info.name)

    def prepare(self, key: str, parent: str = "", *,
                labels: Mapping[str, str] | None = None) -> list[Mount]:
        raise self._refuse(key)

    def view(self, key: str, parent: str = "", *,
             labels: Mapping[str, str] | None = None) -> list[Mount]:
        raise self._refuse(key)

    def commit(self, name: str, key: str, *, labels: Mapping[str, str] | None = None) -> None:
        raise self._refuse(key)

    def remove(self, key: str) -> None:
        raise self._refuse(key)

    def cleanup(self) -> None:
        raise self._refuse("cleanup")

    def close(self) -> None:
        """Nothing to release: ``sn`` is its opener's."""
