"""Snapshot directories made ahead of time, so a server's Prepare skips a flush.

A new snapshot's directory must be on disk before the row that names it: the
plain path renames a ``new-`` directory to its id inside the write transaction
and fsyncs the snapshots directory before the commit, a journal commit of its
own on every Prepare. A server keeps a stock of directories made and made
durable in batches instead:

1. ids are reserved in the metadata (:meth:`~lamina.snapshots.storage.Transaction.reserve_ids`
   moves the id sequence on; the commit is on disk before step 2);
2. ``<id>/`` is made and flocked (under the lock a scan for orphans takes, so
   it is never seen unlocked), then filled as a new snapshot without parents
   is (``fs/``, and ``work/`` for overlay);
3. the snapshots directory is fsynced once for the batch, as the plain path
   does for its one rename (the entries made inside ``<id>/`` before it are on
   disk with it on a journaling filesystem, the same assumption the plain path
   makes for its ``new-`` directory's contents).

A Prepare then takes one and only inserts its row with that id: the directory
was durable before the row existed. Until then the directory is unknown to the
metadata and flocked by the process that made it, which ``cleanup`` and
``check`` (of any process) take for work in progress, as a ``new-`` one. A
kill leaves unknown, unlocked directories, which the next ``cleanup`` removes,
and reserved ids nobody uses (ids are never reused anyway). On close the stock
is deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from lamina.fs.files import fsync_dir, remove_tree
from lamina.snapshots.storage import MetaStore
from lamina.util import crash

__all__ = ["SERVER_STOCK", "Ahead", "AheadDirs"]

#: How many directories ``lamina serve``'s snapshotters keep made ahead.
SERVER_STOCK = 32


@dataclass(frozen=True)
class Ahead:
    """A directory made ahead: ``path`` is ``<snapshots>/<sid>``, flocked through ``fd``."""

    sid: str
    path: Path
    fd: int


class AheadDirs:
    """A stock of up to ``size`` directories made ahead (see the module docs), refilled
    by a thread of its own once it runs below half; ``size`` 0 keeps no stock (only
    :meth:`fill` adds some). ``fill`` fills one new directory as a snapshot without
    parents; ``settled`` is the lock a maker holds from ``mkdir`` to ``flock``."""

    def __init__(self, dirs: Path, meta: MetaStore, *, size: int,
                 fill: Callable[[Path], None],
                 settled: Callable[[], AbstractContextManager[None]]) -> None:
        self._dirs = dirs
        self._meta = meta
        self._size = size
        self._fill = fill
        self._settled = settled
        self._stock: list[Ahead] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> Ahead | None:
        """A directory to adopt (its row must use its id), or None when out of stock.
        Give it :meth:`back` if no row takes it, else :meth:`adopted` once one did."""
        with self._lock:
            got = self._stock.pop() if self._stock else None
            low = self._size and len(self._stock) < self._size // 2
            if low and self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._refill_loop, daemon=True,
                                                name=f"ahead {self._dirs}")
                self._thread.start()
        if low:
            self._wake.set()
        return got

    def back(self, ahead: Ahead) -> None:
        """Return an unused directory to the stock."""
        with self._lock:
            self._stock.append(ahead)

    def adopted(self, ahead: Ahead) -> None:
        """A committed row names the directory now: no longer this stock's to hold."""
        os.close(ahead.fd)

    def fill(self, count: int) -> int:
        """Make ``count`` directories ahead now (see the module docs); how many."""
        with self._meta.write() as tx:
            sids = tx.reserve_ids(count)
        crash.point("ahead.reserved")
        made: list[Ahead] = []
        try:
            with self._settled():
                for sid in sids:
                    path = self._dirs / sid
                    path.mkdir(mode=0o700)
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    made.append(Ahead(sid, path, fd))
                    fcntl.flock(fd, fcntl.LOCK_EX)
            for a in made:
                self._fill(a.path)
            crash.point("ahead.made")
            fsync_dir(self._dirs)
            crash.point("ahead.durable")
        except BaseException:
            _discard(made)
            raise
        with self._lock:
            self._stock.extend(made)
        return len(made)

    def _refill_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                break
            with self._lock:
                want = self._size - len(self._stock)
            if want > self._size // 2:
                with contextlib.suppress(Exception):  # out of space, closing: none ahead
                    self.fill(want)

    def close(self) -> None:
        """Stop refilling and delete the stock (before the metadata closes)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            stock, self._stock = self._stock, []
        _discard(stock)


def _discard(stock: list[Ahead]) -> None:
    """Delete directories made ahead while still holding them (unknown to the
    metadata: a kill halfway leaves an orphan for ``cleanup``)."""
    for a in stock:
        with contextlib.suppress(OSError):
            remove_tree(a.path)
        os.close(a.fd)
