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

Optional interfaces
-------------------
Beside the protocol, a snapshotter may implement small optional interfaces,
which callers test with ``isinstance(sn, Interface)`` (they are runtime
checkable protocols), never by concrete class:

* :class:`LocalDirectories` — snapshots live in local directories: garbage
  collection leaves a snapshot alone while anything is mounted from its
  directory, ``lamina check --deep`` walks a layer's own files, and the diff
  service walks an overlay upperdir instead of comparing two mounted trees;
* :class:`Staging` — a layer can be extracted into a directory before its
  snapshot exists (in overlayfs upperdir form, so only with
  :attr:`Capability.OVERLAY`): unpack extracts layers in parallel this way;
* :class:`LayerStreams` — a layer's tar stream becomes a new snapshot's own
  layer with nothing extracted (the erofs snapshotter writes its image):
  unpack hands it each layer this way;
* :class:`LayerDigests` — a committed layer is a file whose digest was
  recorded at commit: ``lamina check --deep`` verifies it;
* :class:`DeferredRemoval` — removed snapshots' directories may be deleted
  later (by a reaper thread, or when a caller holding a lock is done);
  :meth:`DeferredRemoval.flush` waits until nothing removed is left on disk;
* :class:`BatchRemoval` — many snapshots go in one metadata transaction
  (garbage collection removes an image's layers so: one commit, not one each);
* :class:`Checker` — metadata and disk can be compared
  (:meth:`Checker.check` returns :class:`lamina.problems.Problem` values; ``cleanup`` repairs
  the ones that are :attr:`Problem.repairable`).

The gRPC client implements none of them: what it cannot do is done by the
server, which owns the directories.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from lamina.labels import MAX_LABEL_SIZE
from lamina.mounts.mount import Mount
from lamina.problems import Problem

__all__ = [
    "MAX_KEY_SIZE",
    "MAX_LABEL_SIZE",
    "BatchRemoval",
    "Capability",
    "Checker",
    "DamagedRows",
    "DeferredRemoval",
    "Info",
    "Kind",
    "LayerDigests",
    "LayerStreams",
    "LocalDirectories",
    "Snapshotter",
    "Staging",
    "Usage",
]

#: The longest snapshot key (and name of a commit), in bytes (UTF-8), as for a
#: label's key and value: keys containerd makes (``extract-<time>-<nonce>
#: sha256:<ChainID>``, CRI's container IDs) are a hundred bytes or so, and its
#: bolt database refuses any past 32 KiB. A longer one is InvalidArgument.
MAX_KEY_SIZE = 4096


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


# -- optional interfaces (see "Optional interfaces" in the module docs) ---------


@runtime_checkable
class LocalDirectories(Protocol):
    """Snapshots backed by directories on this machine."""

    @property
    def root(self) -> Path:
        """The directory holding all of the snapshotter's state."""
        ...

    def snapshot_dir(self, key: str) -> Path:
        """Everything snapshot ``key`` owns on disk; a mount of anything below it pins it."""
        ...

    def layer_dir(self, key: str) -> Path:
        """The snapshot's own files: with :attr:`Capability.OVERLAY` its overlayfs
        upperdir (its changes only, whiteouts as 0/0 devices), else its whole tree."""
        ...


@runtime_checkable
class Staging(Protocol):
    """Layers extracted into a directory before their snapshot exists."""

    def staging(self) -> AbstractContextManager[Path]:
        """An empty layer directory, removed at the end unless adopted by
        :meth:`prepare_staged`; ``cleanup`` leaves it alone while in use."""
        ...

    def prepare_staged(
        self, key: str, parent: str, staged: Path, *, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Prepare active ``key`` on ``parent`` whose own layer is the filled ``staged``."""
        ...


@runtime_checkable
class LayerStreams(Protocol):
    """Layers written into a snapshot straight from their tar stream."""

    def prepare_stream(
        self,
        key: str,
        parent: str,
        stream: IO[bytes],
        *,
        expected_diff_id: str | None = None,
        max_size: int | None = ...,
        labels: Mapping[str, str] | None = None,
        wait: Callable[[], None] | None = None,
        parent_root: Callable[[], object | None] | None = None,
        on_root: Callable[[object], None] | None = None,
    ) -> str:
        """Prepare active ``key`` on committed ``parent`` whose own layer is the
        layer read from ``stream`` (plain, gzip or zstd), as applying it on a mount
        of the new snapshot would leave it; returns its DiffID, checked against
        ``expected_diff_id``. Commit or remove ``key`` as any active snapshot.
        With ``wait``, ``parent`` need not exist yet: ``wait`` is called once the
        stream is read and returns when it is committed (layers written in
        parallel, committed in order).
        ``on_root`` is handed, as soon as it is known, what this layer's root
        directory will be; ``parent_root`` returns what the parent's ``on_root``
        was handed (None: not known, ask the committed parent). With both, a layer
        written in parallel settles against the layer below before that one is
        committed, and waits only to be committed itself.
        Raises :class:`~lamina.archive.apply.NeedsLowerLayers` where the layer
        says something only its parent's files can resolve: apply it on a mount."""
        ...


@runtime_checkable
class LayerDigests(Protocol):
    """Committed layers are files whose digest was recorded at commit."""

    def verify_layer(self, key: str) -> str:
        """What is wrong with committed ``key``'s layer file, in words ("" when it
        still has the digest recorded at commit)."""
        ...


@runtime_checkable
class DeferredRemoval(Protocol):
    """Removed snapshots' directories may outlive the call that removed them."""

    def deferred_removal(self) -> AbstractContextManager[None]:
        """Directories of snapshots removed in the block are deleted when it ends
        (their metadata goes at once): for callers holding a lock."""
        ...

    def flush(self) -> int:
        """Delete every directory already removed from the metadata, waiting for a
        background reaper; returns how many went. Afterwards the space is free."""
        ...


@runtime_checkable
class BatchRemoval(Protocol):
    """Many snapshots can be removed in one metadata transaction."""

    def remove_many(self, keys: Sequence[str]) -> set[str]:
        """Remove ``keys`` in the order given (children before their parents) in one
        metadata transaction, then their directories, as :meth:`Snapshotter.remove`
        does for one. A key that no longer exists is passed over; one that may not
        be removed (it has children, or another owner) is kept, and so are its
        parents then: returns the keys kept."""
        ...


@runtime_checkable
class DamagedRows(Protocol):
    """Snapshots whose metadata no snapshotter wrote are left out of walks (``check``
    reports them); what they still hold can be asked."""

    def damaged_holds(self) -> list[tuple[str, str, dict[str, str]]]:
        """Each snapshot left out of walks for its damage, as far as it reads: its
        key, its parent's key ("" for none, or none that exists) and the labels that
        are text. A collector keeps all it points at: it may still be in use."""
        ...


@runtime_checkable
class Checker(Protocol):
    """Metadata and disk can be compared."""

    def check(self) -> list[Problem]:
        """Every disagreement between metadata and disk; empty when consistent."""
        ...
