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

The file is created 0600 before SQLite opens it; SQLite gives its ``-wal`` and
``-shm`` files the database's mode. Files an earlier lamina left 0644 are
tightened on open.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator

from lamina.errors import ResourceExhausted, Unavailable
from lamina.fs.perms import FILE_MODE, tighten

__all__ = ["Database"]

BUSY_TIMEOUT_MS = 60_000
_SQLITE_FULL = 13


class Database:
    """One SQLite file; thread-safe; transactions are serialised per process."""

    def __init__(self, path: str | os.PathLike[str], schema: str) -> None:
        self.path = os.fspath(path)
        self._lock = threading.RLock()
        # Created 0600 here if missing, with O_EXCL: opening (and closing) an existing
        # database file would drop every POSIX lock this process holds on it, the
        # locks another SQLite connection of this process relies on.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             FILE_MODE))
        for suffix in ("", "-wal", "-shm", "-journal"):
            tighten(self.path + suffix, FILE_MODE)
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
            check_same_thread=False,
        )
        self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._enable_wal()
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self.write() as c:
            for stmt in schema.split(";"):
                if stmt.strip():
                    c.execute(stmt)

    def _enable_wal(self) -> None:
        """Switch to WAL. Two processes creating the same new file race on this, and
        SQLite does not apply the busy timeout to it: retry until the timeout."""
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

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on error."""
        with self._lock:
            conn = self.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise Unavailable(f"database {self.path} is busy: {exc}") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL:
                    raise ResourceExhausted(f"database {self.path}: the disk is full") from exc
                raise
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read snapshot of the database."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
