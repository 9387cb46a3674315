"""SQLite access shared by every lamina store.

Each store keeps its metadata in one SQLite file in WAL mode with a busy
timeout, so several processes can share a root. Write transactions start with
``BEGIN IMMEDIATE``: the write lock is taken up front, and a transaction that
reads and then writes cannot deadlock against another writer.

Durability: WAL with ``synchronous=FULL``, so a transaction that returned is
on disk (the WAL is fsynced at every commit), not just safe from a process
kill. That ordering is what crash safety rests on: a directory is renamed
into place inside the transaction that records it and deleted only after
the one that forgets it, so after a power cut the metadata may be *behind*
the disk (``cleanup`` removes what it does not know) but never ahead of it.
With ``synchronous=NORMAL`` a commit could be undone by a power cut after
its directory was already deleted. A full disk is ResourceExhausted.

Group commit (``group_commit=True``): SQLite fsyncs the WAL once per COMMIT,
so writers of several threads (a server's calls) share one transaction
instead of taking turns at one fsync each. The first writer begins the
transaction and runs its body; writers already waiting run theirs in the
same transaction, each inside a savepoint of its own (an error undoes that
body alone); when nobody waits any more the first writer syncs what the
bodies asked for (:meth:`Database.sync_before_commit`) and commits, and only
then does any of them return. So every write still returns only once it is
on disk, and what a body did on disk is durable before the commit that
records it: the ordering above holds for each body as it did alone. A failed
commit fails every body of the batch.

A new file is built aside (0600, in WAL mode, with its schema) and linked
into place whole, for two syncs (see :func:`_create`); SQLite gives its
``-wal`` and ``-shm`` files the database's mode. Files an earlier lamina left
0644 are tightened on open.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource  # here, not where it is needed: there no descriptor is left to load it
import sqlite3
import threading
import time
from collections.abc import Iterator

from lamina.errors import ResourceExhausted, Unavailable, from_os_error
from lamina.fs.files import fsync_dir, names_open_file
from lamina.fs.perms import FILE_MODE, tighten

__all__ = ["Database"]

BUSY_TIMEOUT_MS = 60_000
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
#: Bodies one group commit takes at most (writers keep arriving under load).
MAX_BATCH = 64


class _Batch:
    """One transaction shared by the write bodies of a group commit."""

    __slots__ = ("closing", "done", "error", "members", "syncs")

    def __init__(self) -> None:
        self.members = 1
        self.closing = False  # no more bodies join
        self.done = False
        self.error: BaseException | None = None
        self.syncs: dict[str, None] = {}  # directories to fsync before COMMIT, in order


class Database:
    """One SQLite file; thread-safe; transactions are serialised per process
    (with ``group_commit``, concurrent writers share one; see the module docs)."""

    def __init__(self, path: str | os.PathLike[str], schema: str, *,
                 group_commit: bool = False) -> None:
        self.path = os.fspath(path)
        self._lock = threading.RLock()
        self._group = group_commit
        mutex = threading.Lock()
        self._cond = threading.Condition(mutex)  # whose turn: writers, the leader
        self._done = threading.Condition(mutex)  # a group's commit, for its bodies
        self._busy = False  # a thread is using the connection (group commit)
        self._queued = 0  # writers waiting to run their bodies
        self._batch: _Batch | None = None  # the open group transaction
        self._readers = threading.local()  # each thread's read connection (group commit)
        self._reader_conns: list[sqlite3.Connection] = []
        try:
            made = not os.path.exists(self.path) and _create(self.path, schema)
            _remove_stale_builds(self.path)
        except (OSError, sqlite3.Error) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"database {self.path}: the disk is full") from exc
            if full := self._full(exc):
                raise full from exc
            raise
        for suffix in ("", "-wal", "-shm", "-journal"):
            tighten(self.path + suffix, FILE_MODE)
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            if full := self._full(exc):
                raise full from exc
            raise
        self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._enable_wal()
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        if made:  # the schema is in already
            return
        with self.write() as c:
            for stmt in schema.split(";"):
                if stmt.strip():
                    c.execute(stmt)

    def _enable_wal(self) -> None:
        """Switch to WAL (a file :func:`_create` made is in it already). Two processes
        switching the same file race on this, and SQLite does not apply the busy
        timeout to it: retry until the timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise Unavailable(f"database {self.path}: {exc}") from exc
                time.sleep(0.01)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise Unavailable(f"database {self.path} is closed")
        return self._conn

    def write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on error."""
        return self._group_write() if self._group else self._write_alone()

    @contextlib.contextmanager
    def _write_alone(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise Unavailable(f"database {self.path} is busy: {exc}") from exc
            batch = self._batch = _Batch()
            try:
                yield conn
                for d in batch.syncs:
                    fsync_dir(d)
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if full := self._full(exc):
                    raise full from exc
                raise
            finally:
                self._batch = None

    def sync_before_commit(self, directory: str | os.PathLike[str]) -> None:
        """fsync ``directory`` before the open write transaction commits (once for
        every body of a group commit that asks): call it inside a write body after a
        rename there that the commit must not get ahead of."""
        batch = self._batch
        if batch is None:
            raise RuntimeError("sync_before_commit outside a write transaction")
        batch.syncs[os.fspath(directory)] = None

    def _full(self, exc: BaseException) -> ResourceExhausted | None:
        """ResourceExhausted for SQLite's "disk full", for a file it could not open
        because the process has no descriptor left, and for an OS error of that
        class on the way to a commit; else None."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code == _SQLITE_FULL:
            return ResourceExhausted(f"database {self.path}: the disk is full")
        if code == _SQLITE_CANTOPEN and _out_of_descriptors():
            return ResourceExhausted(f"database {self.path}: too many open files")
        if isinstance(exc, OSError):  # a directory's fsync before the commit, say
            known = from_os_error(exc)
            if isinstance(known, ResourceExhausted):
                return ResourceExhausted(f"database {self.path}: {known.message}")
        return None

    @contextlib.contextmanager
    def _group_write(self) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        with self._cond:
            self._queued += 1
            try:
                while self._busy or (self._batch is not None and self._batch.closing):
                    self._cond.wait()
            finally:
                self._queued -= 1
            self._busy = True
            batch = self._batch
            leader = batch is None
            if batch is not None:
                batch.members += 1
        try:
            if leader:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    raise Unavailable(f"database {self.path} is busy: {exc}") from exc
                batch = self._batch = _Batch()  # no savepoint: nobody joins before it ends
            else:  # a savepoint: an error undoes this body alone
                conn.execute("SAVEPOINT body")
            assert batch is not None
        except BaseException:
            self._release(closing=False)
            raise
        try:
            yield conn
            if not leader:
                conn.execute("RELEASE body")
        except BaseException as exc:
            if leader:  # alone in the transaction so far: roll it all back
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._finish(batch)
            elif conn.in_transaction:
                conn.execute("ROLLBACK TO body")
                conn.execute("RELEASE body")
                self._release(closing=False)
            else:  # SQLite gave the whole transaction up (a full disk): the batch is lost
                batch.error = exc
                self._release(closing=True)
            if full := self._full(exc):
                raise full from exc
            raise
        if leader:
            self._commit(batch)
        else:
            self._release(closing=batch.members >= MAX_BATCH)
            self._wait(batch)
        if batch.error is not None:
            err = batch.error
            if full := self._full(err):
                raise full from err
            raise Unavailable(f"database {self.path}: the transaction was lost: {err}") from err

    def _release(self, *, closing: bool) -> None:
        with self._cond:
            self._busy = False
            if closing and self._batch is not None:
                self._batch.closing = True
            self._cond.notify_all()

    def _wait(self, batch: _Batch) -> None:
        with self._done:  # woken once, by the commit (not by every body's turn)
            while not batch.done:
                self._done.wait()

    def _commit(self, batch: _Batch) -> None:
        """The leader, its body done: let the writers already waiting run their
        bodies, then sync and commit for all of them. Alone, it commits at once,
        keeping the connection (nobody to wake, nothing to wait for)."""
        conn = self.conn
        with self._cond:
            if self._queued:
                self._busy = False  # the connection passes to the writers waiting
                if batch.members >= MAX_BATCH:
                    batch.closing = True
                self._cond.notify_all()
                while self._busy or (self._queued and not batch.closing):
                    self._cond.wait()
                self._busy = True
            batch.closing = True
        try:
            if batch.error is None:
                for d in batch.syncs:
                    fsync_dir(d)
                conn.execute("COMMIT")
        except BaseException as exc:
            batch.error = exc
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        with self._cond:
            batch.done = True
            self._batch = None
            self._busy = False
            self._cond.notify_all()
            self._done.notify_all()

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read snapshot of the database."""
        try:
            with self._read() as conn:
                yield conn
        except sqlite3.Error as exc:
            if full := self._full(exc):  # a journal it could not open, say
                raise full from exc
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        if not self._group:
            with self._lock, _snapshot(self.conn) as conn:
                yield conn
            return
        with self._cond:
            idle = not self._busy and self._batch is None
            self._busy = self._busy or idle
        if not idle:  # a connection of the thread's own: sees only what committed,
            with _snapshot(self._reader()) as conn:  # and waits for no group's fsync
                yield conn
            return
        try:  # the writers' connection, its cache warm
            with self._lock, _snapshot(self.conn) as conn:
                yield conn
        finally:
            self._release(closing=False)

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (group commit): reads neither wait for a
        group's fsync nor see bodies it may still fail to commit."""
        self.conn  # noqa: B018 -- Unavailable once closed
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            with self._cond:
                self._reader_conns.append(conn)
            self._readers.conn = conn
        return conn

    def close(self) -> None:
        with self._cond:
            readers, self._reader_conns = self._reader_conns, []
            self._readers = threading.local()
        for r in readers:
            r.close()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_JOURNALS = ("", "-wal", "-shm", "-journal")  # a SQLite file and the files beside it
_CLAIM_TRIES = 8


def _create(path: str, schema: str) -> bool:
    """Make the database file ``path``, in WAL mode with ``schema``, unless another
    process makes it first; True if this call made it.

    It is built under a temporary name with no syncs (nothing refers to it yet),
    fsynced once and linked into place, and the directory is fsynced once: two
    syncs, where switching a new file to WAL in place and committing its schema
    take seven (its rollback journal twice, the file, the WAL twice and the
    directory for each of the two new journals). A
    crash leaves either no file or the whole of it, never a half-made one at
    ``path``; the temporary file it may leave is removed when the database is
    next opened (:func:`_remove_stale_builds`). The link never replaces a file
    another process made meanwhile, and ``path`` itself is never opened here:
    closing a descriptor of it would drop every POSIX lock this process holds on
    it, the locks another SQLite connection of this process relies on."""
    directory = os.path.dirname(path) or "."
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd, tmp = _claimed_temp(path)
    except BaseException:
        os.close(dir_fd)
        raise
    try:
        try:
            _build(tmp, path, schema)
        except (OSError, sqlite3.Error):
            if os.path.exists(path):  # another process made it meanwhile
                return False
            raise
        os.fsync(fd)
        os.close(fd)  # before the link: no descriptor of the linked file is closed after
        fd = -1
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except FileNotFoundError:  # removed as stale: once ``path`` exists (below)
            if os.path.exists(path):
                return False
            raise
        os.fsync(dir_fd)
        return True
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(dir_fd)
        for suffix in _JOURNALS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp + suffix)


def _claimed_temp(path: str) -> tuple[int, str]:
    """A new empty file beside ``path`` (mode 0600) and its name, flocked for as long
    as the descriptor is open: :func:`_remove_stale_builds` leaves a file whose
    build is still running alone. The name is checked to still be the locked file
    (a remover may have taken it between its creation and the lock)."""
    import fcntl
    import tempfile

    directory = os.path.dirname(path) or "."
    for _ in range(_CLAIM_TRIES):
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if names_open_file(fd, tmp):
                return fd, tmp
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise Unavailable(f"database {path}: its new file was removed {_CLAIM_TRIES} times "
                      "while being made")


def _build(tmp: str, path: str, schema: str) -> None:
    """Write ``schema`` into the empty file ``tmp`` in WAL mode, checkpointed into
    the file itself, without syncs."""
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # made durable as a whole by the caller
        conn.execute("PRAGMA journal_mode=WAL")  # recorded in the file's header
        conn.execute("BEGIN IMMEDIATE")
        for stmt in schema.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        conn.execute("COMMIT")
        # the schema into the file itself (only the file is linked), not left to
        # the checkpoint SQLite makes on close unless told otherwise
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise Unavailable(f"database {path}: its new file could not be checkpointed")
    finally:
        conn.close()


def _out_of_descriptors(margin: int = 8) -> bool:
    """Whether this process is within ``margin`` descriptors of its limit: SQLite
    says only that it could not open a file, and by the time it says so the
    descriptors of the failed attempt are closed again."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    return soft != resource.RLIM_INFINITY and used + margin >= soft


def _remove_stale_builds(path: str) -> None:
    """Remove what a :func:`_create` killed before it cleaned up left beside ``path``
    (its temporary file and that file's journals), once ``path`` exists. A build
    still running holds its file's flock (:func:`_claimed_temp`) and is left alone:
    it has lost the race to link and removes its own files when it ends."""
    import fcntl

    directory, base = os.path.split(path)
    prefix = f".{base}-"
    names = set(os.listdir(directory or "."))
    for name in sorted(names):
        if not name.startswith(prefix) or name.endswith(_JOURNALS[1:]):
            continue
        full = os.path.join(directory, name)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a build in progress
            for suffix in _JOURNALS:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(full + suffix)
        finally:
            os.close(fd)
    for name in names:  # journals whose file is gone already
        if name.startswith(prefix) and name.endswith(_JOURNALS[1:]):
            stem = name[:name.rindex("-")]
            if not os.path.exists(os.path.join(directory, stem)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A read transaction on ``conn``."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")
