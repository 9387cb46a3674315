"""Garbage collection over a root's label graph, with containerd's conventions.

Roots of the graph:

* every image (→ its target blob), every container (→ its snapshots);
* every blob or snapshot labelled ``containerd.io/gc.root``;
* every blob or snapshot created while an unexpired lease exists (see
  :mod:`lamina.metadata.leases`), whatever an unexpired lease's own
  ``containerd.io/gc.ref.*`` labels name (as ``ctr image mount`` does), and
  the resources recorded in unexpired leases;
* every snapshot whose directory is in use by a mount (an overlay upper,
  work or lower directory, or the source of a bind mount): removing it would
  pull files out from under a live mount.

Edges:

* a blob's or snapshot's ``containerd.io/gc.ref.content`` and
  ``containerd.io/gc.ref.content.<anything>`` labels → that blob;
* ``containerd.io/gc.ref.snapshot.<snapshotter>`` (optionally ``/<anything>``
  after the snapshotter name) → that snapshot key in that snapshotter;
* a snapshot → its parent.

Everything not reached is removed: snapshots leaf first so a parent always
goes after its children, then blobs, so a crash in between leaves
unreferenced blobs rather than a layer whose tree manifest blob is gone.

Only the CLI's objects are collected (:mod:`lamina.owners`): the candidates
are the snapshots the CLI owns and the blobs it holds a reference to, seen
through the stores' CLI-only scope; removing a blob drops the CLI's
reference, and the file stays while containerd holds one. What containerd
owns is never a candidate — its own collection, through ``lamina serve``,
sees only what is containerd's. Mark and sweep run under an exclusive
lock on the root, so two collections never interleave.

Ordering against concurrent writers: the objects (blobs, snapshots) that
may be removed are listed *before* the roots (leases, images, containers) are
read, and the references between objects (labels, parents) are read again
*after* the roots. So an object created under a lease is always seen together
with that lease, and a reference its creator added before ending the lease is
always followed (an unpack labels an image's config with its top snapshot,
then drops its lease: a collection that listed the config before the label
and the leases after the drop must still keep the snapshot). The roots are
read once more after marking, under the metadata database's write lock, which
is then held while blobs and snapshots are removed; if the roots changed
meanwhile the mark is redone. Work that reuses an existing object records it
as a lease resource before relying on it, so it sees the object either kept
or already gone.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from lamina.content import BatchDelete, ContentStore
from lamina.errors import FailedPrecondition, NotFound
from lamina.fs.files import locked
from lamina.labels import GC_REF_CONTENT, GC_REF_SNAPSHOT, GC_ROOT
from lamina.metadata.leases import LeaseManager
from lamina.metadata.root import Root
from lamina.mounts.mount import cleanup_temp_mounts
from lamina.mounts.mountinfo import read_mountinfo
from lamina.owners import CLI, Scoped
from lamina.snapshots import (
    BatchRemoval,
    DamagedRows,
    DeferredRemoval,
    Info,
    LocalDirectories,
    Snapshotter,
)
from lamina.util import crash

__all__ = ["Report", "collect", "label_edges"]

#: Leeway when comparing creation times with a lease's: clocks are read by
#: different code paths (and rounded differently), so err on keeping.
LEASE_SLACK = timedelta(milliseconds=5)
_MARK_ATTEMPTS = 5

Node = tuple[str, str]  # ("content", digest) or ("snapshot:<name>", key)


@dataclass
class Report:
    """What a collection removed (or would remove, on a dry run)."""

    content: list[tuple[str, int]] = field(default_factory=list)
    snapshots: list[tuple[str, str, int]] = field(default_factory=list)
    dry_run: bool = False
    released: list[str] = field(default_factory=list)
    """Blobs whose CLI reference was dropped while another owner still held them
    (the file stays: nothing freed)."""

    @property
    def bytes_freed(self) -> int:
        return sum(s for _, s in self.content) + sum(s for _, _, s in self.snapshots)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "content": [{"digest": d, "size": s} for d, s in self.content],
            "snapshots": [{"snapshotter": n, "key": k, "size": s}
                          for n, k, s in self.snapshots],
            "released": list(self.released),
            "bytes_freed": self.bytes_freed,
        }


def _own_snapshotter(root: Root, name: str) -> Snapshotter:
    """Snapshotter ``name`` as the CLI alone sees it (see the module docs)."""
    sn = root.snapshotter(name)
    return sn.scoped(CLI) if isinstance(sn, Scoped) else sn


def _own_content(root: Root) -> ContentStore:
    store = root.content()
    scoped: ContentStore = store.scoped(CLI) if isinstance(store, Scoped) else store
    return scoped


def _holders(root: Root) -> Mapping[str, frozenset[str]]:
    """Who holds each blob (lamina.owners), where the content store says."""
    holders = getattr(root.content(), "holders", None)
    return holders() if callable(holders) else {}


def label_edges(labels: Mapping[str, str]) -> Iterable[Node]:
    """The nodes a set of ``containerd.io/gc.ref.*`` labels points at."""
    for k, v in labels.items():
        if not v:
            continue
        if k == GC_REF_CONTENT or k.startswith(GC_REF_CONTENT + "."):
            yield ("content", v)
        elif k.startswith(GC_REF_SNAPSHOT):
            name = k[len(GC_REF_SNAPSHOT):].split("/", 1)[0]
            if name:
                yield (f"snapshot:{name}", v)


@dataclass(frozen=True)
class _Roots:
    """What the mark starts from, besides labels on the objects themselves."""

    since: datetime | None
    nodes: tuple[Node, ...]


class _RootReader:
    """Reads the roots through the root's stores (opened up front, because opening
    one writes its schema and the sweep holds the metadata write lock)."""

    def __init__(self, root: Root) -> None:
        self.leases = root.leases()
        self.images = root.images()
        self.containers = root.containers()

    def read(self) -> _Roots:
        active = self.leases.active()
        nodes: list[Node] = [("content", i.target.digest) for i in self.images.list()]
        nodes += [(f"snapshot:{c.snapshotter}", key)
                  for c in self.containers.list() for key in c.snapshot_keys()]
        for lease in active:
            nodes.extend(label_edges(lease.labels))
        nodes += self.leases.active_resources()
        since = min((lease.created for lease in active), default=None)
        return _Roots(since - LEASE_SLACK if since is not None else None,
                      tuple(sorted(set(nodes))))


# -- snapshots in use by mounts ------------------------------------------------------

@dataclass(frozen=True)
class _MountTable:
    entries: tuple[tuple[str, str, str], ...]  # (device, root in its fs, mount point)
    overlay_dirs: frozenset[str]

    @classmethod
    def read(cls) -> _MountTable:
        try:
            mounts = read_mountinfo()
        except OSError:
            return cls((), frozenset())
        dirs: set[str] = set()
        for m in mounts:
            if m.fstype == "overlay":
                for key in ("lowerdir", "upperdir", "workdir", "lowerdir+", "datadir+"):
                    for value in m.super_option(key):
                        dirs.update(os.path.normpath(p) for p in value.split(":") if p)
        return cls(tuple((m.device, m.root, m.mount_point) for m in mounts), frozenset(dirs))

    def in_use(self, path: Path) -> bool:
        """Whether ``path`` (a snapshot's directory or its ``fs``) backs a mount."""
        real = os.path.realpath(path)
        if any(d == real or d.startswith(real + "/") for d in self.overlay_dirs):
            return True
        # the filesystem holding ``real``: the deepest mount point above it
        best: tuple[str, str, str] | None = None
        for dev, fsroot, point in self.entries:
            if (real == point or real.startswith(point.rstrip("/") + "/")) and (
                    best is None or len(point) >= len(best[2])):
                best = (dev, fsroot, point)
        if best is None:
            return False
        dev, fsroot, point = best
        rel = os.path.normpath(fsroot.rstrip("/") + "/" + real[len(point):].lstrip("/"))
        for e_dev, e_root, e_point in self.entries:
            if e_dev != dev or e_point == point:
                continue
            if e_root == rel or e_root.startswith(rel.rstrip("/") + "/"):
                return True  # a bind mount of (part of) this directory
        return False


def _mounted_snapshots(root: Root, name: str, infos: Mapping[str, Info]) -> list[Node]:
    sn = _own_snapshotter(root, name)
    if not isinstance(sn, LocalDirectories) or not infos:
        return []
    table = _MountTable.read()
    if not table.entries:
        return []
    out: list[Node] = []
    for key in infos:
        try:
            directory = sn.snapshot_dir(key)
        except NotFound:
            continue
        if table.in_use(directory):
            out.append((f"snapshot:{name}", key))
    return out


# -- collection ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Objects:
    """Blobs and snapshots as listed at one moment."""

    blobs: dict[str, Any]
    snaps: dict[str, dict[str, Info]]

    @classmethod
    def read(cls, root: Root) -> _Objects:
        return cls({info.digest: info for info in _own_content(root).walk()},
                   {name: {i.name: i for i in _own_snapshotter(root, name).walk()}
                    for name in root.snapshotter_names()})


def collect(root: Root, *, dry_run: bool = False) -> Report:
    """Mark from the roots, sweep the rest; returns what was (or would be) removed."""
    report = Report(dry_run=dry_run)
    with locked(root.path / "locks" / "gc"):
        if not dry_run:  # a killed process's temporary mount would pin its snapshot
            cleanup_temp_mounts(root.tmpmounts)
        content = _own_content(root)
        reader = _RootReader(root)
        # The write lock is held on a connection of its own, so the reads that
        # follow (through the root's stores) still see the database meanwhile.
        guard = LeaseManager(root.metadata_path)
        try:
            guard.expire_old()
            for attempt in range(_MARK_ATTEMPTS):
                last = attempt + 1 == _MARK_ATTEMPTS
                # ``held`` closes first: the lock goes before deferred deletions run
                with contextlib.ExitStack() as deferred, contextlib.ExitStack() as held:
                    if last:  # no more retries: mark with writers held off
                        held.enter_context(guard.locked())
                    # candidates, then the roots, then the references (see the module docs)
                    candidates = _Objects.read(root)
                    roots = reader.read()
                    current = _Objects.read(root)
                    damaged = _held_by_damaged(root, candidates.snaps)
                    marked = _mark(root, candidates, current, roots, damaged)
                    holders = _holders(root)
                    sizes = _doomed_sizes(root, candidates, marked)
                    # Removal happens while leases, images and containers cannot
                    # change, and only if they did not change since the mark.
                    if not last:
                        held.enter_context(guard.locked())
                        if reader.read() != roots:
                            continue  # mark again: labels may have changed too
                    crash.point("gc.marked")
                    # Snapshots first: a crash between the two sweeps then leaves
                    # unreferenced blobs (collected next time), never a layer whose
                    # tree manifest blob is gone (check --deep would report it).
                    for name, infos in candidates.snaps.items():
                        deferred.enter_context(_deferred_removal(root, name))
                        _sweep_snapshots(root, name, infos, marked, sizes, report,
                                         dry_run=dry_run)
                        crash.point("gc.swept-snapshots")
                    if not dry_run:  # exits before the deferrals: joined, then they reap
                        deferred.enter_context(_deleting_meanwhile(root, report))
                    # what the sweep leaves (a snapshot it could not remove, a damaged
                    # one it never saw) keeps what its labels name, though no root does
                    marked |= _reach(candidates, current,
                                     [*_left_after_sweep(candidates, report), *damaged])
                    doomed = [d for d in sorted(candidates.blobs) if ("content", d) not in marked]
                    for digest in doomed:
                        if len(holders.get(digest, ())) > 1:
                            report.released.append(digest)
                        else:
                            report.content.append((digest, candidates.blobs[digest].size))
                    if not dry_run:
                        _delete_blobs(content, doomed)
                break
        finally:
            guard.close()
        if not dry_run:
            _clean_directories(root)
    return report


def _clean_directories(root: Root) -> None:
    """What killed work left in the snapshotters' directories goes, as containerd's
    collector has its snapshotters clean up after a sweep: only directories no
    snapshot's row names and no live process holds (see the snapshotters' cleanup),
    so neither containerd's snapshots nor anyone's work in progress is touched."""
    for name in root.snapshotter_names():
        root.snapshotter(name).cleanup()


def _delete_blobs(content: ContentStore, digests: Sequence[str]) -> None:
    if isinstance(content, BatchDelete):  # one transaction, one directory sync
        content.delete_many(digests)
        return
    for digest in digests:
        with contextlib.suppress(NotFound):
            content.delete(digest)


def _mark(root: Root, candidates: _Objects, current: _Objects, roots: _Roots,
          damaged: Iterable[Node]) -> set[Node]:
    """What the roots, and ``damaged`` (:func:`_held_by_damaged`), reach. Edges are
    taken from ``current`` (read after the roots) where it has the object, else from
    ``candidates``."""
    since = roots.since

    def fresh(created: datetime | None) -> bool:
        return since is not None and created is not None and created >= since

    blobs = {**candidates.blobs, **current.blobs}
    snaps = {name: {**candidates.snaps.get(name, {}), **current.snaps.get(name, {})}
             for name in {*candidates.snaps, *current.snaps}}
    start: list[Node] = list(roots.nodes)
    start += [("content", d) for d, i in blobs.items()
              if GC_ROOT in i.labels or fresh(i.created)]
    for name, infos in snaps.items():
        start += [(f"snapshot:{name}", k) for k, i in infos.items()
                  if GC_ROOT in i.labels or fresh(i.created)]
        start += _mounted_snapshots(root, name, infos)
    start += damaged
    return _reach(candidates, current, start)


def _left_after_sweep(candidates: _Objects, report: Report) -> list[Node]:
    """The snapshots the sweep leaves (or, in a dry run, would)."""
    gone = {(name, key) for name, key, _ in report.snapshots}
    return [(f"snapshot:{name}", key) for name, infos in candidates.snaps.items()
            for key in infos if (name, key) not in gone]


def _held_by_damaged(root: Root, names: Iterable[str]) -> list[Node]:
    """What the damaged snapshots of snapshotters ``names``, which no walk lists, point
    at as far as they read (their labels that are text, their parents): kept, as
    what they hold cannot be told."""
    held: list[Node] = []
    for name in names:
        sn = _own_snapshotter(root, name)
        if isinstance(sn, DamagedRows):
            for _, parent, labels in sn.damaged_holds():
                held += label_edges(labels)
                if parent:
                    held.append((f"snapshot:{name}", parent))
    return held


def _reach(candidates: _Objects, current: _Objects, start: Iterable[Node]) -> set[Node]:
    """Every node ``start`` reaches through labels and parents; edges are taken from
    ``current`` where it has the object, else from ``candidates``."""
    blobs = {**candidates.blobs, **current.blobs}
    snaps = {name: {**candidates.snaps.get(name, {}), **current.snaps.get(name, {})}
             for name in {*candidates.snaps, *current.snaps}}
    marked: set[Node] = set()
    stack = list(start)
    while stack:
        node = stack.pop()
        if node in marked:
            continue
        marked.add(node)
        kind, ident = node
        if kind == "content":
            if ident in blobs:
                stack.extend(label_edges(blobs[ident].labels))
        else:
            info = snaps.get(kind.split(":", 1)[1], {}).get(ident)
            if info is not None:
                stack.extend(label_edges(info.labels))
                if info.parent:
                    stack.append((kind, info.parent))
    return marked


def _doomed_sizes(root: Root, candidates: _Objects, marked: set[Node]) -> dict[Node, int]:
    """Sizes of the snapshots about to go, measured before the lock is taken."""
    sizes: dict[Node, int] = {}
    for name, infos in candidates.snaps.items():
        sn = _own_snapshotter(root, name)
        for key in infos:
            node = (f"snapshot:{name}", key)
            if node not in marked:
                with contextlib.suppress(NotFound):
                    sizes[node] = sn.usage(key).size
    return sizes


@contextlib.contextmanager
def _deferred_removal(root: Root, name: str) -> Iterator[None]:
    """Snapshots removed in the block lose their directories after it (the
    metadata lock is released first: deleting trees can take long)."""
    sn = _own_snapshotter(root, name)
    if not isinstance(sn, DeferredRemoval):
        yield
        return
    with sn.deferred_removal():
        yield


@contextlib.contextmanager
def _deleting_meanwhile(root: Root, report: Report) -> Iterator[None]:
    """The swept snapshots' directories deleted by a thread while the block deletes
    the blobs, joined when it ends. Their rows are committed and the directories
    out of the id space (``rm-``), so nothing orders their deletion after the
    blobs': a layer's unlinks (an erofs image: freeing its page cache) then
    overlap the blobs' unlinks and the syncs of their transaction, and the
    caller, done with the blobs, takes the directories the thread has not."""
    swept = dict.fromkeys(name for name, _, _ in report.snapshots)
    removals = [sn for sn in (_own_snapshotter(root, n) for n in swept)
                if isinstance(sn, DeferredRemoval)]
    if not removals:
        yield
        return
    failed: list[BaseException] = []

    def delete() -> None:
        try:
            for sn in removals:
                with contextlib.suppress(OSError):  # left to the deferral's own pass
                    sn.flush()
        except BaseException as exc:  # raised by the caller, after the join
            failed.append(exc)

    worker = threading.Thread(target=delete, name="gc: removed directories", daemon=True)
    worker.start()
    try:
        yield
        delete()  # then shares what is left with the thread (the snapshotters' reap)
    finally:
        worker.join()
    if failed:
        raise failed[0]


def _sweep_snapshots(root: Root, name: str, infos: Mapping[str, Info], marked: set[Node],
                     sizes: Mapping[Node, int], report: Report, *, dry_run: bool) -> None:
    sn = _own_snapshotter(root, name)
    doomed = {k for k in infos if (f"snapshot:{name}", k) not in marked}
    remove: Callable[[str], bool]
    if dry_run:
        remove = _anyway
    elif isinstance(sn, BatchRemoval):  # one transaction for them all
        kept = sn.remove_many(list(_leaves_first(infos, doomed, _anyway)))
        remove = (doomed - kept).__contains__
    else:
        remove = _remove_one(sn)
    for key in _leaves_first(infos, doomed, remove):
        report.snapshots.append((name, key, sizes.get((f"snapshot:{name}", key), 0)))


def _anyway(key: str) -> bool:
    return True


def _leaves_first(infos: Mapping[str, Info], doomed: set[str],
                  remove: Callable[[str], bool]) -> Iterator[str]:
    """The ``doomed`` snapshots that ``remove`` removes, each after its children: one
    it does not remove (a child appeared meanwhile) keeps its parents too."""
    children: dict[str, int] = {k: 0 for k in infos}
    for info in infos.values():
        if info.parent in children:
            children[info.parent] += 1
    ready = sorted((k for k in doomed if children[k] == 0), reverse=True)
    while ready:
        key = ready.pop()
        if not remove(key):
            continue
        yield key
        parent = infos[key].parent
        if parent in doomed:
            children[parent] -= 1
            if children[parent] == 0:
                ready.append(parent)


def _remove_one(sn: Snapshotter) -> Callable[[str], bool]:
    def remove(key: str) -> bool:
        try:
            sn.remove(key)
        except NotFound:
            pass
        except FailedPrecondition:
            return False  # a child appeared meanwhile: it keeps this one
        return True
    return remove
