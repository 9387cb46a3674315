"""Container records and their revisions: create, upgrade keeping the rw layer, roll back.

A container's filesystem is an active snapshot (a *revision*) on its image's
top ChainID. Each revision snapshot carries labels:

* ``containerd.io/gc.root`` — a timestamp; revisions are kept until pruned;
* ``lamina.io/revision.image`` — the image it was made from;
* ``lamina.io/revision.container`` — the container it belongs to;
* ``lamina.io/revision.previous`` — the key of the revision before it.

**Upgrade** prepares a new revision on the new image's ChainID, applies the
diff of the current revision's rw layer onto it (so what the container wrote
survives), and points the container at it. **Rollback** points the container
at the previous revision again — with that revision's own writes.
Revision keys carry nanoseconds and a random suffix, so they are unique even
within one second.

This module owns the container records and the revision snapshots; it knows
nothing of tasks or checkpoints (:mod:`lamina.containers.service` puts them
together).
"""

from __future__ import annotations

import builtins
import contextlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from lamina.containers.options import options_spec, with_spec
from lamina.errors import AlreadyExists, Damaged, FailedPrecondition, NotFound
from lamina.fs.files import sync_filesystem
from lamina.images.service import ImageService
from lamina.labels import (
    GC_ROOT,
    REVISION_CONTAINER,
    REVISION_IMAGE,
    REVISION_PREVIOUS,
)
from lamina.metadata.containers import Container
from lamina.metadata.root import Root
from lamina.mounts.mount import Mount
from lamina.snapshots import Snapshotter

__all__ = [
    "Revision",
    "Revisions",
]


@dataclass(frozen=True)
class Revision:
    key: str
    image: str
    previous: str
    created: datetime | None
    current: bool


def _new_key(cid: str) -> str:
    now = datetime.now(UTC)
    return f"lamina.revision.{cid}.{now.strftime('%Y%m%dT%H%M%S.%f')}.{secrets.token_hex(3)}"


class Revisions:
    """Container records and their revision snapshots on one root and snapshotter."""

    def __init__(self, root: Root, *, snapshotter: str = "overlay",
                 images: ImageService | None = None) -> None:
        self.root = root
        self.snapshotter_name = snapshotter
        self.images = images or ImageService(root, snapshotter=snapshotter)
        self.store = root.containers()

    @property
    def sn(self) -> Snapshotter:
        return self.images.snapshots

    # -- records -------------------------------------------------------------
    def get(self, cid: str) -> Container:
        return self.store.get(cid)

    def list(self) -> list[Container]:
        return self.store.list()

    def readable(self) -> tuple[builtins.list[Container], builtins.list[Damaged]]:
        """The records that read, and the error of each damaged one."""
        return self.store.readable()

    def _prepare_revision(self, cid: str, image: str, previous: str = "") -> str:
        top = self.images.chain_id(image)
        key = _new_key(cid)
        labels = {GC_ROOT: datetime.now(UTC).isoformat(), REVISION_IMAGE: image,
                  REVISION_CONTAINER: cid}
        if previous:
            labels[REVISION_PREVIOUS] = previous
        self.sn.prepare(key, top, labels=labels)
        return key

    def create(
        self,
        image: str,
        cid: str,
        *,
        labels: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Container:
        """A new container on ``image``: a fresh revision snapshot and a record.

        ``options`` (args, env, mounts...) are kept with the record and used
        every time the container's runtime spec is generated.
        """
        with contextlib.suppress(NotFound):
            self.store.get(cid)
            raise AlreadyExists(f"container {cid!r} already exists")
        self.images.get(image)
        key = self._prepare_revision(cid, image)
        try:
            return self.store.create(Container(
                id=cid, image=image, snapshotter=self.snapshotter_name, snapshot_key=key,
                spec=options_spec(options),
                labels=dict(labels or {})))
        except BaseException:
            self.sn.remove(key)
            raise

    def set_spec(self, container: Container, spec: Mapping[str, Any]) -> Container:
        """Record the runtime spec generated for ``container`` (options are kept)."""
        return self.store.update(with_spec(container, spec))

    def mounts(self, container: Container) -> builtins.list[Mount]:
        """The mounts of the container's current revision."""
        return self.sn.mounts(container.snapshot_key)

    # -- revisions -----------------------------------------------------------
    def revisions(self, cid: str) -> builtins.list[Revision]:
        """Every revision of ``cid``, oldest first."""
        return self._labeled(cid, self.store.get(cid).snapshot_key)

    def _labeled(self, cid: str, current: str) -> builtins.list[Revision]:
        """The snapshots labelled as revisions of ``cid``, oldest first."""
        infos = self.sn.walk(f'labels."{REVISION_CONTAINER}"=={cid}')
        revs = [Revision(key=i.name, image=i.labels.get(REVISION_IMAGE, ""),
                         previous=i.labels.get(REVISION_PREVIOUS, ""), created=i.created,
                         current=i.name == current) for i in infos]
        return sorted(revs, key=lambda r: (r.created or datetime.min.replace(tzinfo=UTC), r.key))

    def upgrade(self, cid: str, image: str) -> Container:
        """Move ``cid`` to ``image``, carrying its rw-layer changes over."""
        container = self.store.get(cid)
        with self.root.leases().held(purpose=f"upgrade {cid}"):  # GC keeps the diff blob
            return self._upgrade(container, image)

    def _upgrade(self, container: Container, image: str) -> Container:
        # the differ (layer diffs and applies) only for an upgrade: run and exec do not
        # import it (startup)
        from lamina.differ import apply_diff, create_diff

        new_key = self._prepare_revision(container.id, image, previous=container.snapshot_key)
        try:
            outcome = create_diff(self.sn, self.images.content, container.snapshot_key,
                                  tmpmounts=str(self.root.tmpmounts))
            apply_diff(self.images.content, outcome.descriptor, self.sn.mounts(new_key),
                       diff_id=outcome.diff_id, tmpmounts=self.root.tmpmounts)
            with contextlib.suppress(NotFound):  # the diff blob served its purpose
                self.images.content.delete(outcome.descriptor.digest)
            # the container's writes must be on disk in the new revision before the
            # record points at it, or a power cut leaves it on a revision without them
            sync_filesystem(self.root.path)
            return self.store.update(replace(container, image=image, snapshot_key=new_key))
        except BaseException:
            self.sn.remove(new_key)
            raise

    def rollback(self, cid: str) -> Container:
        """Point ``cid`` back at its previous revision."""
        container = self.store.get(cid)
        previous = self.sn.stat(container.snapshot_key).labels.get(REVISION_PREVIOUS, "")
        if not previous:
            raise FailedPrecondition(f"container {cid!r}: no previous revision")
        try:
            info = self.sn.stat(previous)
        except NotFound:
            raise FailedPrecondition(
                f"container {cid!r}: previous revision {previous!r} was pruned") from None
        image = info.labels.get(REVISION_IMAGE, "")
        if not image:
            raise FailedPrecondition(f"revision {previous!r} has no image label")
        return self.store.update(replace(container, image=image, snapshot_key=previous))

    def prune_revisions(self, cid: str, *, keep: int) -> builtins.list[str]:
        """Remove all but the ``keep`` newest revisions (never the current one).

        A kept revision whose previous one goes (or is already gone: a prune that
        was interrupted) loses its ``previous`` label first, then the others are
        removed, so the labels never name a removed revision for long and running
        the prune again finishes an interrupted one."""
        revs = self.revisions(cid)
        keep_keys = {r.key for r in revs[-keep:]} if keep > 0 else set()
        keep_keys |= {r.key for r in revs if r.current}
        for rev in revs:
            if rev.key in keep_keys and rev.previous and rev.previous not in keep_keys:
                info = self.sn.stat(rev.key)
                self.sn.update(replace(info, labels={REVISION_PREVIOUS: ""}),
                               f"labels.{REVISION_PREVIOUS}")
        removed = []
        for rev in revs:
            if rev.key not in keep_keys:
                self.sn.remove(rev.key)
                removed.append(rev.key)
        return removed

    def remove(self, cid: str) -> builtins.list[str]:
        """Remove the record and every revision snapshot; returns the removed keys.
        A damaged record goes too: its revisions are found by their labels."""
        try:
            revs = self.revisions(cid)
        except Damaged:
            revs = self._labeled(cid, "")
        self.store.delete(cid)
        removed = []
        for rev in reversed(revs):
            with contextlib.suppress(NotFound):
                self.sn.remove(rev.key)
                removed.append(rev.key)
        return removed

