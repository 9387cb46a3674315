"""What directory-backed snapshotters share: the crash-safe lifecycle.

Each snapshot owns ``<root>/snapshots/<id>/`` (``fs/`` holds its tree, and
overlay adds ``work/``). The filesystem follows the database:

* **create** (prepare/view): build the directory as ``new-<random>`` (held
  with an exclusive flock so a concurrent ``cleanup`` leaves it alone),
  insert the row inside a write transaction, rename the directory to its id
  in that same transaction, fsync the snapshots directory, commit. A server
  (``ahead``) keeps directories made durable ahead of time under ids
  reserved for them (:mod:`lamina.snapshots.ahead`): a prepare that one serves
  (no parent, or a top parent whose root a new directory's matches) only
  inserts its row with that id.
* **commit** only changes metadata: the committed snapshot keeps the id.
* **remove**: delete the row, commit, and only then rename the directory to
  ``rm-<id>`` and delete it (now, or at the next cleanup with async remove).
* **cleanup**: inside a write transaction, every directory whose name is not
  a known id (and is not flocked: a ``new-`` directory still being built, one
  made ahead, a removal in progress) is found;
  after the commit they are renamed to ``rm-…`` and deleted, together with
  every removal still waiting for the background reaper (async remove): when
  cleanup returns, the space of everything removed before it is free.
  containerd calls it at the end of a garbage collection, so ``ctr image rm
  --sync`` returns with the directories gone.

A crash at any point leaves at most a directory the metadata does not know,
which the next ``cleanup`` removes; the metadata never names a missing
directory. A ``rm-`` directory is flocked by the process deleting it (as a
``new-`` one by the process building it, and one made ahead by the process
keeping it), so :meth:`check` in another process — the CLI beside a
``lamina serve`` whose reaper is at work — does not take a removal in progress
for a leftover.

Subclasses say how a new snapshot's directory is filled and how it mounts.
Every directory snapshotter implements the optional interfaces
:class:`~lamina.snapshots.LocalDirectories`, :class:`~lamina.snapshots.Staging`,
:class:`~lamina.snapshots.DeferredRemoval`, :class:`~lamina.snapshots.BatchRemoval`
and :class:`~lamina.snapshots.Checker`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import ClassVar

from lamina.errors import FailedPrecondition, NotFound
from lamina.fs.files import remove_tree
from lamina.fs.perms import private_dirs, tighten
from lamina.mounts.mount import Mount
from lamina.owners import ScopedViews
from lamina.problems import Problem, ProblemType
from lamina.snapshots import Capability, Info, Kind, Usage
from lamina.snapshots.ahead import Ahead, AheadDirs
from lamina.snapshots.storage import MetaStore, Snapshot, Transaction
from lamina.snapshots.usage import disk_usage
from lamina.util import crash

__all__ = ["DirectorySnapshotter"]

_NEW = "new-"
_RM = "rm-"


class DirectorySnapshotter(ScopedViews):
    """Common lifecycle; subclasses implement ``_fill`` and ``_mounts`` and declare
    ``CAPABILITIES``."""

    #: What this kind of snapshotter can do whoever runs it (see :attr:`capabilities`).
    CAPABILITIES: ClassVar[frozenset[Capability]] = frozenset()
    #: How many ancestors a snapshot may have (None: any number): a snapshot on a
    #: deeper parent is refused with ResourceExhausted before any disk work.
    MAX_DEPTH: ClassVar[int | None] = None
    #: Whether threads may share a reap pass (see :meth:`reap`): deleting a removed
    #: snapshot's directory is mostly the kernel's work, a few unlinks of large
    #: files run without the GIL. A tree walked in Python is deleted by one pass at
    #: a time: two would only take turns at the GIL, slower than one.
    SHARED_REAP: ClassVar[bool] = False

    def __init__(self, root: str | os.PathLike[str], *, async_remove: bool = False,
                 ahead: int = 0) -> None:
        """``async_remove``: removed snapshots' directories are deleted by a thread
        (a server). ``ahead``: how many directories to keep made ahead for prepares
        (:mod:`lamina.snapshots.ahead`; a server under churn wants some, a command
        that prepares a few none)."""
        self.root = Path(root)
        self._dirs = self.root / "snapshots"
        private_dirs(self._dirs)  # owner-only; an earlier lamina made the root 0755
        tighten(self.root)
        tighten(self._dirs)
        self._meta: MetaStore | None = MetaStore(self.root / "metadata.db")
        self._ahead = AheadDirs(
            self._dirs, self._meta, size=ahead, fill=lambda d: self._fill(d, Kind.ACTIVE, ()),
            settled=lambda: self._new_dirs_settled(scan=False))
        self._async_remove = async_remove
        self._init_views()
        self._deferring = [0]  # shared with the scoped views
        self._removing: dict[str, int] = {}  # rm- directories this process holds
        self._removing_lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        # a directory taken out of the id space that this process could not delete
        # (out of descriptors): reaped as the snapshotter closes
        self._left_for_reap = False
        self._reap_now = threading.Event()
        # rm- directories a thread of this process is deleting (SHARED_REAP), else
        # one deleting pass at a time in this process
        self._reaping: set[str] = set()
        self._reaped = threading.Condition()
        self._reap_lock = threading.Lock()
        self._stopping = threading.Event()
        if async_remove:
            self._reaper = threading.Thread(target=self._reap_loop, daemon=True,
                                            name=f"reaper {self.root}")
            self._reaper.start()
        if ahead:  # a server: a killed one's stock is left unknown and unlocked
            with contextlib.suppress(OSError):
                self.cleanup()

    # -- hooks -------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[Capability]:
        """:attr:`CAPABILITIES`, and CHOWN when the process runs as root."""
        if os.geteuid() == 0:
            return self.CAPABILITIES | {Capability.CHOWN}
        return self.CAPABILITIES

    def _fill(self, new_dir: Path, kind: Kind, parent_ids: Sequence[str]) -> None:
        """Populate a new snapshot's directory (``fs/`` and whatever else it needs)."""
        raise NotImplementedError

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        raise NotImplementedError

    def _ahead_fits(self, kind: Kind, parent_ids: Sequence[str], made: Path) -> bool:
        """Whether ``made``, filled as an active snapshot without parents, is what
        :meth:`_fill` would make for this one (then a prepare may adopt it)."""
        return kind is Kind.ACTIVE and not parent_ids

    # -- helpers -----------------------------------------------------------
    @property
    def meta(self) -> MetaStore:
        if self._meta is None:
            raise FailedPrecondition(f"snapshotter at {self.root} is closed")
        return self._meta

    def fs_dir(self, sid: str) -> Path:
        """The tree of snapshot ``sid`` (its upper layer, for overlay)."""
        return self._dirs / sid / "fs"

    def snapshot_dir(self, key: str) -> Path:
        """Everything snapshot ``key`` owns on disk (:class:`LocalDirectories`)."""
        with self.meta.read(self._scope) as tx:
            return self._dirs / tx.sid(key)

    def layer_dir(self, key: str) -> Path:
        """The snapshot's own files (:class:`LocalDirectories`)."""
        with self.meta.read(self._scope) as tx:
            return self.fs_dir(tx.sid(key))

    def snapshot(self, key: str) -> Snapshot:
        """Internal view of ``key``: id, kind and parent ids (used by fast paths)."""
        with self.meta.read(self._scope) as tx:
            return tx.snapshot(key)

    # -- owners (lamina.owners) ----------------------------------------------
    def owners(self) -> dict[str, str]:
        """The owner of every snapshot this view sees, by key."""
        with self.meta.read(self._scope) as tx:
            return tx.owners()

    # -- Snapshotter -------------------------------------------------------
    def stat(self, key: str) -> Info:
        with self.meta.read(self._scope) as tx:
            return tx.info(key)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        with self.meta.write(self._scope) as tx:
            return tx.update(info, fieldpaths)

    def usage(self, key: str) -> Usage:
        with self.meta.read(self._scope) as tx:
            stored = tx.stored_usage(key)
            sid = tx.sid(key)
        if stored is not None:
            return stored
        return disk_usage(self.fs_dir(sid))

    def mounts(self, key: str) -> list[Mount]:
        with self.meta.read(self._scope) as tx:
            snap = tx.snapshot(key)
        if snap.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r} is committed and has no mounts")
        return self._mounts(snap)

    def prepare(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
        *,
        staged: Path | None = None,
    ) -> list[Mount]:
        with self.meta.read(self._scope) as tx:  # fail fast, before any disk work
            tx.check_new_key(key)
            _, chain = tx.resolve_parent(parent, max_depth=self.MAX_DEPTH)
        if staged is None and (ahead := self._ahead.take()) is not None:
            snap_ahead = self._create_ahead(ahead, kind, key, parent, labels, chain)
            if snap_ahead is not None:
                return self._mounts(snap_ahead)
        held = self._new_dir() if staged is None else contextlib.nullcontext(staged)
        with held as new:
            try:
                self._fill(new, kind, chain)
            except FileNotFoundError:  # the parent went away after the lookup
                raise NotFound(f"parent snapshot {parent!r} was removed while "
                               f"creating {key!r}") from None
            crash.point("create.filled")
            target: Path | None = None
            try:
                with self.meta.write(self._scope) as tx:
                    snap = tx.create(kind, key, parent, labels)
                    if snap.parent_ids != chain:  # parent replaced meanwhile: refill
                        remove_tree(new)
                        new.mkdir(mode=0o700)
                        self._fill(new, kind, snap.parent_ids)
                    dest = self._dirs / snap.id
                    if os.path.lexists(dest):  # left by a crash before its row committed
                        remove_tree(dest)
                    crash.point("create.before-rename")
                    os.rename(new, dest)
                    target = dest
                    tx.sync_before_commit(self._dirs)  # the rename is durable first
                    crash.point("create.after-rename")
            except BaseException:
                if target is not None:  # the row did not commit: take the directory back
                    os.rename(target, new)
                raise
        crash.point("create.committed")
        return self._mounts(snap)

    def _create_ahead(self, ahead: Ahead, kind: Kind, key: str, parent: str,
                      labels: Mapping[str, str] | None,
                      chain: Sequence[str]) -> Snapshot | None:
        """Create ``key`` in a directory made ahead: its row alone (the directory is
        durable already); None, the directory given back, when it does not fit."""
        if not self._ahead_fits(kind, chain, ahead.path):
            self._ahead.back(ahead)
            return None
        try:
            with self.meta.write(self._scope) as tx:
                snap = tx.create(kind, key, parent, labels, sid=ahead.sid)
                if snap.parent_ids != tuple(chain) and not self._ahead_fits(
                        kind, snap.parent_ids, ahead.path):  # parent replaced meanwhile
                    raise _Unfit
                crash.point("create.ahead-row")
        except _Unfit:
            self._ahead.back(ahead)
            return None
        except BaseException:
            self._ahead.back(ahead)  # the row did not commit
            raise
        self._ahead.adopted(ahead)
        crash.point("create.committed")
        return snap

    def fill_ahead(self, count: int) -> int:
        """Make ``count`` directories ahead for prepares now (a server's stock refills
        by itself); how many were made."""
        return self._ahead.fill(count)

    @contextlib.contextmanager
    def _new_dirs_settled(self, *, scan: bool) -> Iterator[None]:
        """Between ``mkdtemp`` and its flock a ``new-`` directory is unlocked: its
        maker holds this lock shared over that gap, and a scan that takes unlocked
        ``new-`` directories for orphans (cleanup, check) holds it exclusive, so it
        never sees one in the gap (containerd's Cleanup through serve once took a
        concurrent prepare's directory that way). The lock is the flock of the
        directory that holds them."""
        fd = os.open(self._dirs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if scan else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _new_dir(self) -> Iterator[Path]:
        """A fresh ``new-…`` directory, flocked while in use; removed unless renamed."""
        with self._new_dirs_settled(scan=False):
            new = Path(tempfile.mkdtemp(prefix=_NEW, dir=self._dirs))
            try:
                fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
            except BaseException:  # out of descriptors: an rmdir needs none
                os.rmdir(new)
                raise
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield new
        finally:
            try:
                if os.path.lexists(new):  # not adopted by a snapshot
                    self._remove_new(new)
            finally:
                os.close(fd)

    def _remove_new(self, new: Path) -> None:
        """Remove the unadopted ``new``; where that fails (the process is out of
        descriptors while other threads hold theirs) take it out of the id space
        instead, for the next reap (this snapshotter's close at the latest), and
        let the error that ended its use be the one told."""
        try:
            remove_tree(new)
        except OSError:
            os.rename(new, self._dirs / (_RM + new.name))
            self._left_for_reap = True

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """An empty layer directory to fill before its snapshot exists.

        Pass it to :meth:`prepare_staged` to make it the new snapshot's layer;
        if it is not adopted it is removed when the context ends. ``cleanup``
        leaves it alone while it is in use.
        """
        with self._new_dir() as new:
            fs = new / "fs"
            fs.mkdir(mode=0o755)
            yield fs

    def prepare_staged(
        self, key: str, parent: str, staged: Path, *, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Prepare active ``key`` whose own layer is the filled ``staged`` directory."""
        if staged.parent.parent != self._dirs or not staged.parent.name.startswith(_NEW):
            raise FailedPrecondition(f"{staged} is not a staging directory of this snapshotter")
        return self._create(Kind.ACTIVE, key, parent, labels, staged=staged.parent)

    def commit(
        self, name: str, key: str, *, labels: Mapping[str, str] | None = None
    ) -> None:
        with self.meta.read(self._scope) as tx:
            snap = tx.snapshot(key)
            if snap.kind is not Kind.ACTIVE:
                raise FailedPrecondition(
                    f"snapshot {key!r} is a {snap.kind.value}, only active ones commit"
                )
            tx.check_new_key(name)
        usage = disk_usage(self.fs_dir(snap.id))
        crash.point("commit.measured")
        with self.meta.write(self._scope) as tx:
            tx.commit(name, key, usage, labels)
        crash.point("commit.committed")

    def remove(self, key: str) -> None:
        with self.meta.write(self._scope) as tx:
            sid = tx.remove(key)
            crash.point("remove.deleted-row")
        crash.point("remove.committed")
        self._discard([sid])

    def remove_many(self, keys: Sequence[str]) -> set[str]:
        """Remove ``keys``, children first, in one transaction (:class:`BatchRemoval`):
        one commit for an image's layers instead of one each."""
        kept: set[str] = set()
        ids: list[str] = []
        with self.meta.write(self._scope) as tx:
            for key in keys:
                try:
                    ids.append(tx.remove(key))  # checks before it changes anything
                except NotFound:
                    pass
                except FailedPrecondition:
                    kept.add(key)
            crash.point("remove.deleted-row")
        crash.point("remove.committed")
        self._discard(ids)
        return kept

    def _discard(self, names: Sequence[str]) -> None:
        """Rename directories out of the id space, then delete them (unless async)."""
        doomed = []
        for name in names:
            src = self._dirs / name
            dst = self._dirs / (name if name.startswith(_RM) else _RM + name)
            self._hold_removal(src, dst)  # before the rename: never seen unlocked
            with contextlib.suppress(FileNotFoundError):
                if src != dst:
                    os.rename(src, dst)
                doomed.append(dst)
        crash.point("discard.renamed")
        if self._deferring[0]:
            return  # deleted when the deferral ends
        if self._async_remove:
            self._reap_now.set()
        else:
            for d in doomed:
                try:
                    self._delete(d)
                except OSError:  # removed all the same: reaped as this snapshotter closes
                    self._left_for_reap = True
            self._release_removals()

    def _delete(self, path: Path) -> None:
        """Delete ``path``, a directory taken out of the id space (``rm-…``)."""
        remove_tree(path)

    def _hold_removal(self, path: Path, dst: Path) -> None:
        """flock directory ``path``, which this process takes out of the id space as
        ``dst``, until it is deleted, so a ``check`` meanwhile (another process's)
        knows it is on its way out."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return
        with self._removing_lock:
            old = self._removing.pop(str(dst), None)
            self._removing[str(dst)] = fd
        if old is not None:
            os.close(old)

    def _release_removals(self) -> None:
        """Drop the locks of removals whose directories are gone."""
        with self._removing_lock:
            gone = [p for p in self._removing if not os.path.lexists(p)]
            fds = [self._removing.pop(p) for p in gone]
        for fd in fds:
            os.close(fd)

    @contextlib.contextmanager
    def deferred_removal(self) -> Iterator[None]:
        """Snapshots removed in the block lose their directories only when it
        ends (their metadata is gone at once): for callers holding a lock."""
        self._deferring[0] += 1
        try:
            yield
        finally:
            self._deferring[0] -= 1
            if not self._deferring[0]:
                if self._async_remove:
                    self._reap_now.set()
                else:
                    with contextlib.suppress(OSError):
                        self.reap()

    def reap(self) -> int:
        """Delete directories already taken out of the id space (``rm-…``); returns how many.

        Safe at any time and from several processes: those directories belong to
        no snapshot any more. A pass running in another thread (the reaper, a
        collection's) is waited for, so on return nothing taken out before the
        call is left; with :attr:`SHARED_REAP` threads share the work instead, each
        directory deleted by the first to take it."""
        count = 0
        alone = contextlib.nullcontext() if self.SHARED_REAP else self._reap_lock
        with alone:
            try:
                pending = [e for e in os.listdir(self._dirs) if e.startswith(_RM)]
                while pending:
                    others = []  # taken by other threads: waited for
                    for entry in pending:
                        if not self._take(entry):
                            others.append(entry)
                            continue
                        try:
                            if os.path.lexists(self._dirs / entry):  # not gone meanwhile
                                self._delete(self._dirs / entry)
                                count += 1
                        finally:
                            self._done_with(entry)
                    self._wait_for(others)
                    # what another thread failed to delete is tried again here
                    pending = [e for e in others if os.path.lexists(self._dirs / e)]
            finally:
                self._release_removals()
        return count

    def _take(self, entry: str) -> bool:
        """Whether this thread takes ``entry`` to delete (no other thread has it)."""
        with self._reaped:
            if entry in self._reaping:
                return False
            self._reaping.add(entry)
            return True

    def _done_with(self, entry: str) -> None:
        with self._reaped:
            self._reaping.discard(entry)
            self._reaped.notify_all()

    def _wait_for(self, entries: Sequence[str]) -> None:
        """Until no other thread is deleting any of ``entries``."""
        with self._reaped:
            self._reaped.wait_for(lambda: self._reaping.isdisjoint(entries))

    def flush(self) -> int:
        """Delete every directory already removed from the metadata, waiting for
        the reaper's pass (:class:`DeferredRemoval`); returns how many went."""
        return self.reap()

    def _reap_loop(self) -> None:
        while not self._stopping.is_set():
            self._reap_now.wait(timeout=5.0)
            self._reap_now.clear()
            if self._stopping.is_set():
                break
            time.sleep(0.2)  # gather a few removals into one pass
            with contextlib.suppress(OSError):
                self.reap()

    def walk(self, *filters: str) -> Iterator[Info]:
        from lamina.util.filters import parse

        matcher = parse(filters)
        with self.meta.read(self._scope) as tx:
            infos = tx.all_infos()
        for info in infos:
            if matcher(_lookup(info)):
                yield info

    def cleanup(self) -> None:
        if self._orphans(self.meta.read(self._scope)):
            # found with a read: taken again under the write lock, so no row can
            # come to name one while it is renamed
            with self.meta.write(self._scope) as tx:
                orphans = self._orphans(contextlib.nullcontext(tx))
        else:
            orphans = []  # the common case (gc calls this) costs no write transaction
        for name in orphans:
            if not name.startswith(_RM):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self._dirs / name, self._dirs / (_RM + name))
        self.reap()  # the orphans, and removals the reaper has not finished

    def _orphans(self, reading: AbstractContextManager[Transaction]) -> list[str]:
        """Directories no row names and no live process holds (see the module docs)."""
        with reading as tx, self._new_dirs_settled(scan=True):
            known = tx.ids()
            return [entry for entry in os.listdir(self._dirs)
                    if entry not in known and not _locked(self._dirs / entry)]

    def damaged_holds(self) -> list[tuple[str, str, dict[str, str]]]:
        """What the snapshots left out of walks for their damage hold (:class:`DamagedRows`)."""
        with self.meta.read(self._scope) as tx:
            return tx.damaged_holds()

    def check(self) -> list[Problem]:
        """Where metadata and disk disagree: rows without a directory, directories
        without a row (``cleanup`` removes those). Empty when consistent."""
        with self.meta.read(self._scope) as tx:
            known = tx.ids()
            damage = tx.damage()
        problems = [
            Problem(ProblemType.SNAPSHOT_DAMAGED, subject,
                    f"snapshot {subject}: {what} (its metadata row is damaged; not "
                    "repaired: what it holds cannot be told)")
            for subject, what in damage
        ]
        problems += [
            Problem(ProblemType.SNAPSHOT_MISSING_DIRECTORY, f"snapshot id {sid}",
                    f"snapshot id {sid}: metadata names it but {self.fs_dir(sid)} is missing")
            for sid in sorted(known, key=int)
            if not self.fs_dir(sid).is_dir()
        ]
        with self._new_dirs_settled(scan=True):
            problems += [
                Problem(ProblemType.SNAPSHOT_ORPHAN_DIRECTORY, str(self._dirs / entry),
                        f"{self._dirs / entry}: directory unknown to the metadata")
                for entry in sorted(os.listdir(self._dirs))
                if entry not in known and not _locked(self._dirs / entry)
            ]
        return problems

    def close(self) -> None:
        if self._view_of is not None:
            return  # a scoped view: its snapshotter closes the shared state
        self._ahead.close()
        if self._reaper is not None:
            self._stopping.set()
            self._reap_now.set()
            self._reaper.join()
            self._reaper = None
            with contextlib.suppress(OSError):
                self.reap()
        elif self._left_for_reap:
            with contextlib.suppress(OSError):
                self.reap()
        with self._removing_lock:
            fds = list(self._removing.values())
            self._removing.clear()
        for fd in fds:
            os.close(fd)
        if self._meta is not None:
            self._meta.close()
            self._meta = None


class _Unfit(Exception):
    """A directory made ahead does not suit the snapshot after all (rolls its row back)."""


def _locked(path: Path) -> bool:
    """Whether another open file holds a flock on directory ``path`` (work in
    progress: see the module docs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True  # gone already: whoever had it renamed it
    except NotADirectoryError:
        return False  # nothing lamina makes: an orphan
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _lookup(info: Info) -> Callable[[tuple[str, ...]], str | None]:
    def field(path: tuple[str, ...]) -> str | None:
        if not path:
            return None
        head = path[0]
        if head == "name" and len(path) == 1:
            return info.name
        if head == "parent" and len(path) == 1:
            return info.parent
        if head == "kind" and len(path) == 1:
            return info.kind.value
        if head == "labels" and len(path) == 2:
            return info.labels.get(path[1])
        return None

    return field

