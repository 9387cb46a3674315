"""Garbage collection over a root's label graph, with containerd's conventions.

Roots of the graph:

* every image (→ its target blob), every container (→ its snapshot);
* every blob or snapshot labelled ``containerd.io/gc.root``;
* every blob or snapshot created while an unexpired lease exists (see
  :mod:`lamina.leases`).

Edges:

* a blob's or snapshot's ``containerd.io/gc.ref.content`` and
  ``containerd.io/gc.ref.content.<anything>`` labels → that blob;
* ``containerd.io/gc.ref.snapshot.<snapshotter>`` (optionally ``/<anything>``
  after the snapshotter name) → that snapshot key in that snapshotter;
* a snapshot → its parent.

Everything not reached is removed: blobs, and snapshots leaf first so a
parent always goes after its children. Mark and sweep run under an exclusive
lock on the root, so two collections never interleave.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from lamina import crash
from lamina.errors import FailedPrecondition, NotFound
from lamina.fsutil import locked
from lamina.leases import LeaseManager
from lamina.root import SNAPSHOTTERS, Root
from lamina.snapshots import Info

__all__ = ["GC_ROOT", "Report", "collect"]

GC_ROOT = "containerd.io/gc.root"
REF_CONTENT = "containerd.io/gc.ref.content"
REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."

Node = tuple[str, str]  # ("content", digest) or ("snapshot:<name>", key)


@dataclass
class Report:
    """What a collection removed (or would remove, on a dry run)."""

    content: list[tuple[str, int]] = field(default_factory=list)
    snapshots: list[tuple[str, str, int]] = field(default_factory=list)
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        return sum(s for _, s in self.content) + sum(s for _, _, s in self.snapshots)


def _label_edges(labels: Mapping[str, str]) -> Iterable[Node]:
    for k, v in labels.items():
        if k == REF_CONTENT or k.startswith(REF_CONTENT + "."):
            yield ("content", v)
        elif k.startswith(REF_SNAPSHOT):
            name = k[len(REF_SNAPSHOT):].split("/", 1)[0]
            if name:
                yield (f"snapshot:{name}", v)


def _snapshotters(root: Root) -> list[str]:
    base = root.path / "snapshots"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and p.name in SNAPSHOTTERS)


def _container_roots(root: Root) -> list[Node]:
    try:
        from lamina.containers.store import ContainerStore
    except ModuleNotFoundError:
        return []
    store = ContainerStore(root.metadata_path)
    try:
        return [(f"snapshot:{c.snapshotter}", key)
                for c in store.list() for key in c.snapshot_keys()]
    finally:
        store.close()


def collect(root: Root, *, dry_run: bool = False) -> Report:
    """Mark from the roots, sweep the rest; returns what was (or would be) removed."""
    from lamina.images.store import ImageStore

    report = Report(dry_run=dry_run)
    with locked(root.path / "locks" / "gc"):
        leases = LeaseManager(root.metadata_path)
        images = ImageStore(root.metadata_path)
        try:
            leases.expire_old()
            since = leases.protected_since()
            image_targets = [i.target.digest for i in images.list()]
        finally:
            leases.close()
            images.close()
        content = root.content()
        blobs = {info.digest: info for info in content.walk()}
        snaps: dict[str, dict[str, Info]] = {
            name: {i.name: i for i in root.snapshotter(name).walk()}
            for name in _snapshotters(root)
        }

        def fresh(created: datetime | None) -> bool:
            return since is not None and created is not None and created >= since

        roots: list[Node] = [("content", d) for d in image_targets]
        roots += _container_roots(root)
        roots += [("content", d) for d, i in blobs.items()
                  if GC_ROOT in i.labels or fresh(i.created)]
        for name, infos in snaps.items():
            roots += [(f"snapshot:{name}", k) for k, i in infos.items()
                      if GC_ROOT in i.labels or fresh(i.created)]

        marked: set[Node] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node in marked:
                continue
            marked.add(node)
            kind, ident = node
            if kind == "content":
                if ident in blobs:
                    stack.extend(_label_edges(blobs[ident].labels))
            else:
                info = snaps.get(kind.split(":", 1)[1], {}).get(ident)
                if info is not None:
                    stack.extend(_label_edges(info.labels))
                    if info.parent:
                        stack.append((kind, info.parent))

        crash.point("gc.marked")
        for digest, blob in sorted(blobs.items()):
            if ("content", digest) not in marked:
                report.content.append((digest, blob.size))
                if not dry_run:
                    with contextlib.suppress(NotFound):
                        content.delete(digest)
        for name, infos in snaps.items():
            crash.point("gc.swept-before-snapshots")
            _sweep_snapshots(root, name, infos, marked, report, dry_run=dry_run)
    return report


def _sweep_snapshots(root: Root, name: str, infos: Mapping[str, Info], marked: set[Node],
                     report: Report, *, dry_run: bool) -> None:
    sn = root.snapshotter(name)
    doomed = {k for k in infos if (f"snapshot:{name}", k) not in marked}
    children: dict[str, int] = {k: 0 for k in infos}
    for info in infos.values():
        if info.parent in children:
            children[info.parent] += 1
    ready = sorted(k for k in doomed if children[k] == 0)
    while ready:
        key = ready.pop()
        size = 0
        with contextlib.suppress(NotFound):
            size = sn.usage(key).size
        report.snapshots.append((name, key, size))
        if not dry_run:
            try:
                sn.remove(key)
            except NotFound:
                pass
            except FailedPrecondition:
                continue  # a child appeared meanwhile: it keeps this one
        parent = infos[key].parent
        if parent in doomed:
            children[parent] -= 1
            if children[parent] == 0:
                ready.append(parent)
