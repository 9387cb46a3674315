"""The snapshot model: how lamina builds a container filesystem from layers.

A snapshot is a filesystem state. Every snapshot has a parent (the empty
string for none), and there are three kinds, which share one key space:

* **active** — created by :meth:`Snapshotter.prepare`. It can be mounted
  read-write; its changes are captured relative to its parent.
* **view** — created by :meth:`Snapshotter.view`. A read-only look at its
  parent; writing into its mounts fails with ``EROFS``. It cannot be committed.
* **committed** — created by :meth:`Snapshotter.commit` from an active
  snapshot. Immutable; only committed snapshots may be parents.

Active snapshots never become committed ones and vice versa: ``commit`` makes
a *new* committed snapshot (``name``) out of the changes of an active one
(``key``), and the active key disappears. Any snapshot may be removed, but a
parent only after its children.

Vocabulary, used by every method: ``key`` names an active snapshot (or any
snapshot, where a method takes any), ``name`` a committed one, ``parent`` the
committed snapshot another one descends from.

Importing a layer
-----------------
Prepare an active snapshot on the empty parent, mount it, apply the layer
tar into the mount (computing its DiffID as you go), unmount, and commit it
under a name; the OCI ChainID of the layers so far is the natural name::

    mounts = sn.prepare("extract-1", "")
    with temp_mount(mounts) as root:
        diff_id = apply_layer(layer_stream, root)
    sn.commit(chain_id, "extract-1")

Importing the next layer
------------------------
The same, but the parent is the previous layer's committed name::

    mounts = sn.prepare("extract-2", chain_id)

The mounted tree starts with the parent's content; what the layer changes is
captured in the new snapshot only.

Running a container
-------------------
Prepare an active snapshot on the image's top ChainID and hand its mounts to
the runtime as the root filesystem::

    mounts = sn.prepare("container-1", image_chain_id)

Commit it to make a new image layer, or remove it to drop the changes.

Snapshotters declare what they can do in :attr:`Snapshotter.capabilities`
(see :class:`Capability`); the conformance suite in
:mod:`lamina.snapshots.testsuite` branches on those, never on names.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from lamina.labels import MAX_LABEL_SIZE
from lamina.mount import Mount

__all__ = [
    "MAX_LABEL_SIZE",
    "Capability",
    "Info",
    "Kind",
    "Snapshotter",
    "Usage",
]



class Kind(enum.Enum):
    """What a snapshot is: a read-only view, an active (writable) snapshot, or committed."""

    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


class Capability(enum.StrEnum):
    """Optional behaviour a snapshotter may declare."""

    #: Mounted trees are backed by overlayfs (upperdir holds only the changes).
    OVERLAY = "overlay"
    #: ``chown`` inside a mounted snapshot works (the process is root).
    CHOWN = "chown"
    #: Hard links survive a commit across snapshot boundaries.
    HARDLINKS = "hardlinks"
    #: Changing one name of a hard-link group that lives in a lower layer changes
    #: every name (overlayfs lacks this: copy-up takes only the changed name).
    LINKED_COPY_UP = "linked-copy-up"
    #: Mounts of deep chains (128 layers and more) are supported.
    DEEP_CHAINS = "deep-chains"


@dataclass(frozen=True)
class Info:
    """What lamina records about a snapshot."""

    kind: Kind
    name: str
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None


@dataclass(frozen=True)
class Usage:
    """Disk use of a snapshot's own layer; hard links count once."""

    size: int = 0
    inodes: int = 0


@runtime_checkable
class Snapshotter(Protocol):
    """Allocates, snapshots and mounts filesystem changesets (see module docs)."""

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What optional behaviour this snapshotter supports."""
        ...

    def stat(self, key: str) -> Info:
        """Info of the snapshot ``key`` of any kind. NotFound when missing."""
        ...

    def update(self, info: Info, *fieldpaths: str) -> Info:
        """Change labels of ``info.name``.

        No fieldpaths replaces all labels; ``labels`` replaces them too;
        ``labels.<k>`` sets one label, or deletes it when the new value is
        empty. Any other path is InvalidArgument. Returns the new Info.
        """
        ...

    def usage(self, key: str) -> Usage:
        """Disk use of the snapshot's own layer."""
        ...

    def mounts(self, key: str) -> list[Mount]:
        """Mounts of an active snapshot or view; FailedPrecondition if committed."""
        ...

    def prepare(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create an active snapshot ``key`` on committed ``parent``; return its mounts."""
        ...

    def view(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create a read-only view ``key`` of committed ``parent``; return its mounts."""
        ...

    def commit(
        self, name: str, key: str, *, labels: Mapping[str, str] | None = None
    ) -> None:
        """Turn the changes of active ``key`` into committed snapshot ``name``."""
        ...

    def remove(self, key: str) -> None:
        """Remove snapshot ``key``; FailedPrecondition while it has children."""
        ...

    def walk(self, *filters: str) -> Iterator[Info]:
        """Every snapshot matching any of ``filters`` (containerd filter syntax)."""
        ...

    def cleanup(self) -> None:
        """Remove on-disk state that the metadata does not know."""
        ...

    def close(self) -> None:
        """Release resources; calling it twice is fine."""
        ...
