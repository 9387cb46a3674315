"""The content store on the local filesystem.

Layout under the store's directory::

    blobs/sha256/<hex>     committed blobs, read-only to their owner (0400)
    ingest/<sha256(ref)>/  one directory per ingest in progress:
        ref                the ref, written last when the ingest is created
        data               the bytes written so far
        total, expected    what the writer declared (empty when unknown)
        startedat          when the ingest was created (ISO 8601)
        updatedat          when a writer last let go of it (the data file's
                           mtime is the live "updated" time)
        lock               flock(2)ed by the one live writer; holds its pid and
                           since when, for the Unavailable message
    metadata.db            one row per committed blob (size, created) and one
                           reference per owner holding it (updated, labels)

Every directory is 0700 and every file 0600 (blobs 0400): see :mod:`lamina.fs.perms`.

Owners (:mod:`lamina.owners`): a blob is held by the owners that have a
reference to it, each with its own labels; an ingest belongs to whoever
opened it (``owner`` in its directory). The store is used in a scope: the
CLI's own (the default) lists every blob — its own labels where it holds
one, else the other owner's — and every ingest; an owner's scope
(:meth:`LocalContentStore.scoped`) sees what that owner holds.

Sharing a blob: the CLI *using* a blob only containerd holds (``info``,
``reader``, ``read_at``, or a writer for it, which answers AlreadyExists)
takes the CLI's reference first (with the labels it saw), in one
transaction — as containerd's
"shared" content policy adopts a blob it finds — and lamina's collection
drops it again when nothing of the CLI's needs it. containerd cannot see
the CLI's blobs, so it writes one it wants; its commit then adds
containerd's reference (the bytes, verified, are dropped with the ingest),
inside the same call that makes containerd's own record of it. Deleting
drops the deleter's reference; the last reference takes the row and the
file. Deleting or labelling a blob only the other owner holds, or aborting
its ingest, is FailedPrecondition.

Concurrency: one writer per ref across processes (the ``lock`` file, taken
non-blocking). Committing, deleting and cleaning up run inside one SQLite
write transaction each, so they are serialised across processes and the
"blob file exists" / "row exists" pair is changed together: a commit renames
the data into ``blobs/`` and inserts the row in the same transaction, the
metadata row being the truth about what is committed.

Crash leftovers and :meth:`LocalContentStore.cleanup`: a crash can leave a
blob file without its row (between the rename and the transaction's commit).
Such a blob is re-hashed: when its content matches its name the row is
re-created (no labels; created = the file's mtime), since the data is good
and a client may already have been told about it; otherwise the file is
deleted. A row whose blob file is gone is deleted: the content is lost and
must be fetched again. Temporary files, half-created ingests and ingests
whose data was already moved into ``blobs/`` are removed; resumable ingests
are kept unless older than ``ingest_max_age``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, BinaryIO

from lamina.archive import limits
from lamina.content import (
    COPY_CHUNK,
    CleanupReport,
    Info,
    Status,
    validate_labels,
)
from lamina.content.digest import SHA256, digest_file, parse_digest, sha256, validate_digest
from lamina.errors import (
    AlreadyExists,
    Damaged,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from lamina.fs.files import WRITEBACK_EVERY, atomic_write, fsync_dir, remove_tree, start_writeback
from lamina.fs.perms import BLOB_MODE, FILE_MODE, private_dirs, tighten, tighten_tree
from lamina.labels import update_labels
from lamina.owners import CLI, ScopedViews, describe_all
from lamina.problems import Problem, ProblemType
from lamina.util import crash, filters
from lamina.util.closing import Closing
from lamina.util.db import Database

__all__ = ["BlobCorrupt", "CleanupReport", "LocalContentStore", "LocalWriter", "hold"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest  TEXT PRIMARY KEY,
    size    INTEGER NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    labels  TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS blob_refs (
    digest  TEXT NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,
    owner   TEXT NOT NULL,
    updated TEXT NOT NULL,
    labels  TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (digest, owner)
);
"""
# blobs.updated and blobs.labels are format 2's; since format 3 the references carry them

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIXES = (".tmp-", ".del-")
MAX_REF_BYTES = 4096


class BlobCorrupt(FailedPrecondition):
    """A committed blob's bytes no longer hash to its digest (or size)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _fmt(t: datetime) -> str:
    return t.isoformat()


def _parse_time(s: str) -> datetime:
    t = datetime.fromisoformat(s.strip())
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _validate_ref(ref: str) -> str:
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("ingest ref must be a non-empty string")
    if len(ref.encode()) > MAX_REF_BYTES or "\x00" in ref:
        raise InvalidArgument(f"invalid ingest ref {ref[:64]!r}: too long or contains NUL")
    return ref


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _write_text(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    with open(fd, "w") as f:
        f.write(text)


def _rehash(fd: int, size: int) -> Any:
    """A sha256 object fed with the first ``size`` bytes of ``fd``."""
    h = sha256()
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(COPY_CHUNK, size - pos), pos)
        if not chunk:
            raise Internal(f"ingest data shrank while re-hashing (at {pos} of {size})")
        h.update(chunk)
        pos += len(chunk)
    return h


class _Lock:
    """The flock on an ingest's ``lock`` file, taken without blocking."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    @classmethod
    def try_acquire(cls, ingest: Path) -> _Lock | None:
        """The lock, or None when a live writer holds it. Creates ``ingest``."""
        path = ingest / "lock"
        while True:
            ingest.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue  # the directory was removed under us: try again
            except OSError:  # no descriptor left, say: leave no empty ingest behind
                with contextlib.suppress(OSError):
                    ingest.rmdir()  # only if empty: another writer's stays
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return None
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file that was removed meanwhile
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {time.time():.6f}\n".encode(), 0)
            return cls(fd)

    @staticmethod
    def describe_holder(ingest: Path, ref: str) -> str:
        text = _read_text(ingest / "lock") or ""
        try:
            pid_s, since_s = text.split()
            since = float(since_s)
            when = datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")
            held = max(0.0, time.time() - since)
            return (f"ingest ref {ref!r} is locked by another writer (pid {pid_s}) "
                    f"since {when}, for {held:.1f}s")
        except ValueError:
            return f"ingest ref {ref!r} is locked by another writer"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


class LocalWriter(Closing):
    """An open ingest of a :class:`LocalContentStore` (see :class:`lamina.content.Writer`)."""

    def __init__(
        self,
        store: LocalContentStore,
        ref: str,
        ingest: Path,
        lock: _Lock,
        data_fd: int,
        *,
        offset: int,
        hasher: Any,
        total: int,
        expected: str,
        started_at: datetime,
    ) -> None:
        self._store = store
        self.ref = ref
        self._ingest = ingest
        self._lock: _Lock | None = lock
        self._fd: int | None = data_fd
        self._offset = offset
        self._hash = hasher
        self.total = total
        self.expected = expected
        self.started_at = started_at
        self._state = "open"
        # One operation at a time: a store closing (or an abort) on another thread
        # waits for a write in flight, and the descriptor is closed exactly once.
        self._mutex = threading.RLock()
        self._space: limits.SpaceGuard | None = None  # made by the first write
        self._written_back = offset  # where the writeback started last (commit's fsync)

    @property
    def offset(self) -> int:
        return self._offset

    def _check_open(self) -> int:
        if self._fd is None:
            raise FailedPrecondition(f"writer for ref {self.ref!r} is {self._state}")
        return self._fd

    def write(self, data: bytes) -> int:
        with self._mutex:
            return self._write(data)

    def _write(self, data: bytes) -> int:
        fd = self._check_open()
        view = memoryview(data).cast("B")
        n = len(view)
        if self.total and self._offset + n > self.total:
            raise FailedPrecondition(
                f"ref {self.ref!r}: writing {n} bytes at offset {self._offset} "
                f"goes beyond the declared total of {self.total} bytes"
            )
        space = self._space_guard(fd)
        space.seen(self._offset + n)
        done = 0
        try:
            while done < n:
                done += os.pwrite(fd, view[done:], self._offset + done)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise space.explain(exc, f"offset {self._offset + done}", False) from exc
            raise
        self._hash.update(view)
        self._offset += n
        if self._offset - self._written_back >= WRITEBACK_EVERY:
            start_writeback(fd, self._written_back, self._offset - self._written_back)
            self._written_back = self._offset
        crash.point("content.write")
        return n

    def _space_guard(self, fd: int) -> limits.SpaceGuard:
        """What keeps this ingest from filling the store's filesystem: its writes
        stop at :func:`lamina.archive.limits.space_reserve` (checked every few MiB),
        and an ENOSPC/EDQUOT met between two checks is the same ResourceExhausted."""
        if self._space is None:
            what = self.expected or f"of ingest {self.ref!r}"
            self._space = limits.SpaceGuard(fd, str(self._store.path),
                                            action=f"store blob {what}")
            self._space.seen(self._offset)
        return self._space

    def digest(self) -> str:
        return f"{SHA256}:{self._hash.hexdigest()}"

    def status(self) -> Status:
        with self._mutex:
            fd = self._check_open()
            updated = datetime.fromtimestamp(os.fstat(fd).st_mtime, UTC)
        return Status(self.ref, self._offset, self.total, self.expected,
                      self.started_at, max(updated, self.started_at))

    def truncate(self, size: int) -> None:
        with self._mutex:
            self._truncate(size)

    def _truncate(self, size: int) -> None:
        fd = self._check_open()
        if size < 0 or size > self._offset:
            raise InvalidArgument(
                f"ref {self.ref!r}: cannot truncate to {size} (offset is {self._offset})"
            )
        os.ftruncate(fd, size)
        self._hash = _rehash(fd, size)
        self._offset = size
        self._written_back = min(self._written_back, size)

    def commit(
        self, size: int, expected: str, *, labels: Mapping[str, str] | None = None
    ) -> None:
        with self._mutex:
            self._commit(size, expected, labels)

    def _commit(self, size: int, expected: str, labels: Mapping[str, str] | None) -> None:
        fd = self._check_open()
        if expected:
            validate_digest(expected)
        checked = validate_labels(labels or {})
        if size < 0:
            raise InvalidArgument(f"invalid commit size {size}")
        crash.point("content.commit.before-fsync")
        os.fsync(fd)
        crash.point("content.commit.fsynced")
        if size and size != self._offset:
            raise FailedPrecondition(
                f"ref {self.ref!r}: commit size {size} does not match the "
                f"{self._offset} bytes written"
            )
        actual = self.digest()
        if expected and expected != actual:
            raise FailedPrecondition(
                f"ref {self.ref!r}: unexpected commit digest {actual}, expected {expected}"
            )
        try:
            self._store._commit_ingest(self._ingest, actual, self._offset, checked)
        except AlreadyExists:
            self._finish("committed (the blob existed already)")
            raise
        self._finish("committed")

    def _finish(self, state: str) -> None:
        """The ingest is done with: remove its directory, release the ref."""
        self._close_fds(state)
        self._store._remove_ingest_dir(self._ingest)
        self._release(state)

    def _close_fds(self, state: str) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._state = state

    def _release(self, state: str) -> None:
        self._state = state
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._store._forget_writer(self)

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    _write_text(self._ingest / "updatedat", _fmt(_now()))
                self._close_fds("closed")
            if self._lock is not None:
                self._release("closed")

    def _abort(self) -> None:
        """The store aborts this ingest: drop the descriptor and the ref."""
        with self._mutex:
            self._close_fds("aborted")
            self._release("aborted")


    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class LocalContentStore(ScopedViews, Closing):
    """The content store in directory ``path`` (see the module docs)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.blobs_dir = self.path / "blobs" / SHA256
        self.ingest_dir = self.path / "ingest"
        private_dirs(self.blobs_dir)
        private_dirs(self.ingest_dir)
        self._tighten()
        self._db = Database(self.path / "metadata.db", _SCHEMA)
        self._lock = threading.Lock()
        self._writers: weakref.WeakValueDictionary[str, LocalWriter] = (
            weakref.WeakValueDictionary()
        )
        self._init_views()

    # ----------------------------------------------------------------- owners

    def holders(self) -> dict[str, frozenset[str]]:
        """Who holds each blob this view sees, by digest."""
        out: dict[str, set[str]] = {}
        with self._db.read() as conn:
            for digest, owner in conn.execute("SELECT digest, owner FROM blob_refs"):
                out.setdefault(digest, set()).add(owner)
        return {d: frozenset(o) for d, o in out.items() if o & self._scope.sees}

    def unheld(self) -> list[str]:
        """Blobs recorded with no owner's reference (cleanup gives them every owner's)."""
        with self._db.read() as conn:
            return [d for (d,) in conn.execute(
                "SELECT digest FROM blobs WHERE digest NOT IN (SELECT digest FROM blob_refs)"
                " ORDER BY digest")]

    def _refs(self, conn: sqlite3.Connection, digest: str) -> dict[str, tuple[str, str]]:
        """Every owner's reference to ``digest``: owner -> (updated, labels)."""
        return {o: (u, lb) for o, u, lb in conn.execute(
            "SELECT owner, updated, labels FROM blob_refs WHERE digest = ?", (digest,))}

    def _add_ref(self, conn: sqlite3.Connection, digest: str, labels: Mapping[str, str],
                 when: str) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO blob_refs (digest, owner, updated, labels) VALUES (?,?,?,?)",
            (digest, self._scope.actor, when, json.dumps(dict(labels), sort_keys=True)),
        )

    def _not_mine(self, digest: str, refs: Mapping[str, object], what: str) -> None:
        """Raise for a blob the acting owner does not hold: FailedPrecondition when
        the scope sees it held by another owner, else NotFound."""
        others = [o for o in refs if self._scope.visible(o)]
        if others:
            raise FailedPrecondition(
                f"cannot {what} content {digest}: it is held by {describe_all(others)}, "
                f"not by {describe_all([self._scope.actor])}")
        raise NotFound(f"content {digest} not found")

    def _tighten(self) -> None:
        """Make a store an earlier lamina left readable (0755 directories, 0444
        blobs, 0644 ingest files) owner-only; a tight store costs four stats."""
        dirs = (self.path, self.blobs_dir.parent, self.blobs_dir, self.ingest_dir)
        if not any([tighten(d) for d in dirs]):
            return
        with os.scandir(self.blobs_dir) as entries:
            for e in entries:
                tighten(e.path, BLOB_MODE if e.is_file(follow_symlinks=False) else 0o700)
        tighten_tree(self.ingest_dir)

    # ------------------------------------------------------------------ blobs

    def blob_path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it exists)."""
        return self.blobs_dir / parse_digest(digest).hex

    @staticmethod
    def _row_info(row: tuple[str, int, str, str, str]) -> Info:
        """The row as an Info; :class:`Damaged` for a row no store wrote."""
        digest, size, created, updated, labels = row
        try:
            parsed = json.loads(labels)
            if not isinstance(parsed, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()):
                raise ValueError(f"its labels {labels[:60]!r} are not an object of strings")
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"its size {size!r} is not a size")
            return Info(digest, size, _parse_time(created), _parse_time(updated), parsed)
        except (ValueError, TypeError, AttributeError) as exc:
            raise Damaged(f"content {digest}: its metadata row is damaged: {exc}") from None

    def _visible_rows(self, conn: sqlite3.Connection,
                      digest: str | None = None) -> list[tuple[str, int, str, str, str]]:
        """(digest, size, created, updated, labels) of the blobs this view sees, one
        per digest: the acting owner's reference where it holds one."""
        seen, args = self._scope.sql("r.owner")
        where = f"{seen} AND b.digest = ?" if digest is not None else seen
        params = (*args, digest) if digest is not None else args
        rows = conn.execute(
            "SELECT b.digest, b.size, b.created, r.updated, r.labels, r.owner FROM blobs b"
            f" JOIN blob_refs r ON r.digest = b.digest WHERE {where} ORDER BY b.digest",
            params,
        ).fetchall()
        chosen: dict[str, tuple[str, int, str, str, str]] = {}
        for d, size, created, updated, labels, owner in rows:
            if d not in chosen or owner == self._scope.actor:
                chosen[d] = (d, size, created, updated, labels)
        return list(chosen.values())

    def _get_row(self, conn: sqlite3.Connection, digest: str) -> Info:
        rows = self._visible_rows(conn, digest)
        if not rows:
            raise NotFound(f"content {digest} not found")
        return self._row_info(rows[0])

    def info(self, digest: str) -> Info:
        """The blob's Info. In the CLI's view, asking about a blob only containerd
        holds takes the CLI's reference to it first (see the module docs)."""
        validate_digest(digest)
        with self._db.read() as conn:
            info = self._get_row(conn, digest)
            if self._scope.actor in self._refs(conn, digest):
                return info
        with self._db.write() as conn:
            if self._scope.actor not in self._refs(conn, digest):
                seen = self._get_row(conn, digest)  # NotFound if it went meanwhile
                self._add_ref(conn, digest, seen.labels, _fmt(_now()))
            return self._get_row(conn, digest)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        validate_digest(info.digest)
        new_labels = validate_labels(info.labels)
        with self._db.write() as conn:
            refs = self._refs(conn, info.digest)
            if self._scope.actor not in refs:
                self._not_mine(info.digest, refs, "label")
            current = self._get_row(conn, info.digest)
            labels = update_labels(current.labels, new_labels, fieldpaths,
                                   what=f"content {info.digest}")
            updated = _now()
            conn.execute(
                "UPDATE blob_refs SET labels = ?, updated = ? WHERE digest = ? AND owner = ?",
                (json.dumps(labels, sort_keys=True), _fmt(updated), info.digest,
                 self._scope.actor),
            )
        return replace(current, labels=labels, updated=updated)

    def walk(self, *filters_: str) -> Iterator[Info]:
        matcher = filters.parse(filters_)
        with self._db.read() as conn:
            rows = self._visible_rows(conn)
        for row in rows:
            try:
                info = self._row_info(row)
            except Damaged:
                continue  # check reports it; gc, seeing nothing, removes nothing
            lookup = filters.make_lookup(
                {"digest": info.digest, "size": str(info.size)}, info.labels
            )
            if matcher(lookup):
                yield info

    def delete(self, digest: str) -> None:
        """Drop the acting owner's reference; the blob goes with the last one."""
        self.blob_path(digest)  # a malformed digest is InvalidArgument, not NotFound
        with self._db.write() as conn:
            refs = self._refs(conn, digest)
            if self._scope.actor not in refs:
                self._not_mine(digest, refs, "delete")
            gone = self._drop_refs(conn, [(digest, len(refs))])
        if gone:
            crash.point("content.delete.committed")

    def delete_many(self, digests: Sequence[str]) -> None:
        """:meth:`delete` of each of ``digests`` in one transaction and one sync of the
        blobs directory (:class:`BatchDelete`); what the owner does not hold is passed over."""
        with self._db.write() as conn:
            held = [(d, len(refs)) for d in digests
                    if self._scope.actor in (refs := self._refs(conn, d))]
            gone = self._drop_refs(conn, held)
        if gone:
            crash.point("content.delete.committed")

    def _drop_refs(self, conn: sqlite3.Connection,
                   held: Sequence[tuple[str, int]]) -> bool:
        """Inside a write transaction, drop the acting owner's reference to each blob
        of ``held`` (digest, how many owners hold it); a blob whose last reference that was goes,
        its file unlinked and the blobs directory synced once. Whether any went."""
        gone: list[str] = []
        for digest, owners in held:
            conn.execute("DELETE FROM blob_refs WHERE digest = ? AND owner = ?",
                         (digest, self._scope.actor))
            if owners == 1:  # the last reference: the blob goes
                conn.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
                gone.append(digest)
        if not gone:
            return False  # another owner still holds each of them
        crash.point("content.delete.row-deleted")
        for digest in gone:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(digest).unlink()
        crash.point("content.delete.unlinked")
        fsync_dir(self.blobs_dir)
        return True

    def reader(self, digest: str) -> BinaryIO:
        path = self.blob_path(digest)
        self.info(digest)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise NotFound(
                f"content {digest} is recorded but its blob is missing (run cleanup)"
            ) from None

    def read_at(self, digest: str, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise InvalidArgument(f"invalid read at offset {offset} of size {size}")
        with self.reader(digest) as f:
            fd = f.fileno()
            size = min(size, max(0, os.fstat(fd).st_size - offset))
            parts: list[bytes] = []
            got = 0
            while got < size:
                chunk = os.pread(fd, min(size - got, 16 * COPY_CHUNK), offset + got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            return b"".join(parts)

    def verify(self, digest: str) -> Info:
        """Re-hash blob ``digest``; BlobCorrupt when it does not match, else its Info
        (taking no reference: a check is not a use)."""
        validate_digest(digest)
        with self._db.read() as conn:
            info = self._get_row(conn, digest)
        try:
            actual, size = digest_file(self.blob_path(digest))
        except FileNotFoundError:
            raise NotFound(f"content {digest} is recorded but its blob is missing") from None
        if actual != digest or size != info.size:
            raise BlobCorrupt(
                f"content {digest} is corrupt: its {size} bytes hash to {actual} "
                f"(recorded size {info.size})"
            )
        return info

    def _damaged(self) -> list[tuple[str, str]]:
        """Every owner's rows that no store wrote: (digest, what is wrong)."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT b.digest, b.size, b.created, r.updated, r.labels FROM blobs b"
                " JOIN blob_refs r ON r.digest = b.digest ORDER BY b.digest").fetchall()
        return Damaged.among(rows, self._row_info)

    def check(self, *, rehash: bool = True) -> list[Problem]:
        """Every blob against its row (re-hashed with ``rehash``, else only found), the
        rows no owner holds, and the files in ``blobs/`` that no row names."""
        problems: list[Problem] = []
        rows = set()
        for digest, message in self._damaged():
            rows.add(digest)  # its file is no orphan: which blob it is cannot be told
            problems.append(Problem(ProblemType.CONTENT_DAMAGED, digest, message))
        for info in self.walk():
            rows.add(info.digest)
            try:
                if rehash:
                    self.verify(info.digest)
                elif not self.blob_path(info.digest).is_file():
                    raise NotFound(f"content {info.digest} is recorded but its blob is missing")
            except BlobCorrupt as exc:
                problems.append(Problem(ProblemType.CONTENT_CORRUPT, info.digest, exc.message))
            except NotFound as exc:
                problems.append(Problem(ProblemType.CONTENT_MISSING, info.digest, exc.message))
        for digest in self.unheld():
            rows.add(digest)
            problems.append(Problem(ProblemType.CONTENT_UNHELD, digest,
                                    f"content {digest}: no owner holds a reference to it"))
        for name in sorted(os.listdir(self.blobs_dir)):
            if f"{SHA256}:{name}" not in rows:
                what = ("temporary file left by a crash" if name.startswith(_TMP_PREFIXES)
                        else "blob file that no metadata row names")
                problems.append(Problem(ProblemType.CONTENT_ORPHAN,
                                        str(self.blobs_dir / name), what))
        return problems

    def add(
        self,
        data: bytes | IO[bytes],
        *,
        expected: str | None = None,
        labels: Mapping[str, str] | None = None,
        exist_ok: bool = False,
    ) -> Info:
        """Ingest and commit ``data`` (bytes or a readable stream) in one go.

        AlreadyExists when the blob is there, unless ``exist_ok`` (then the
        existing Info is returned and ``labels`` are not applied).
        """
        ref = f"add-{os.urandom(16).hex()}"  # random as uuid4, without importing uuid
        total = len(data) if isinstance(data, bytes | bytearray) else 0
        try:
            w = self.writer(ref, total=total, expected=expected or "")
        except AlreadyExists:
            if exist_ok and expected:
                return self.info(expected)
            raise
        digest = ""
        try:
            if isinstance(data, bytes | bytearray):
                w.write(data)
            else:
                while chunk := data.read(COPY_CHUNK):
                    w.write(chunk)
            digest = w.digest()
            w.commit(total, expected or "", labels=labels)
        except AlreadyExists:
            if exist_ok:
                return self.info(digest)
            raise
        except BaseException:
            w.close()
            with contextlib.suppress(NotFound, Unavailable):
                self.abort(ref)
            raise
        return self.info(digest)

    # ---------------------------------------------------------------- ingests

    def _ingest_path(self, ref: str) -> Path:
        return self.ingest_dir / sha256(ref.encode()).hexdigest()

    def writer(self, ref: str, *, total: int = 0, expected: str = "") -> LocalWriter:
        _validate_ref(ref)
        if total < 0:
            raise InvalidArgument(f"invalid total size {total}")
        if expected:
            validate_digest(expected)
            self._check_expected(expected)
        ingest = self._ingest_path(ref)
        lock = _Lock.try_acquire(ingest)
        if lock is None:
            raise Unavailable(_Lock.describe_holder(ingest, ref))
        try:
            w = self._open_ingest(ref, ingest, lock, total, expected)
        except BaseException:
            lock.release()
            raise
        with self._lock:
            self._writers[ref] = w
        return w

    def follow(self, ref: str) -> BinaryIO:
        """A reader on ingest ``ref``'s data file as it grows: its descriptor stays
        valid when the commit renames the file into ``blobs/``."""
        _validate_ref(ref)
        try:
            return open(self._ingest_path(ref) / "data", "rb", buffering=0)
        except FileNotFoundError:
            raise NotFound(f"ingest {ref} not found") from None

    def _check_expected(self, expected: str) -> None:
        """AlreadyExists when the acting owner holds ``expected``. The CLI's view
        takes a reference to a blob only containerd holds and says AlreadyExists
        too; containerd writes such a blob, and its reference is added when it
        commits (see the module docs)."""
        with self._db.read() as conn:
            if not self._refs(conn, expected):
                return
        with self._db.write() as conn:
            refs = self._refs(conn, expected)
            if self._scope.actor in refs:
                raise AlreadyExists(f"content {expected} already exists")
            if refs and all(self._scope.visible(o) for o in refs):
                self._add_ref(conn, expected, self._get_row(conn, expected).labels,
                              _fmt(_now()))
                raise AlreadyExists(f"content {expected} already exists "
                                    f"(now held by {describe_all([*refs, self._scope.actor])})")

    def _ingest_owner(self, ingest: Path) -> str | None:
        """Who opened the ingest (None for an ingest of an earlier format: anyone's)."""
        owner = _read_text(ingest / "owner")
        return owner.strip() if owner is not None else None

    def _open_ingest(
        self, ref: str, ingest: Path, lock: _Lock, total: int, expected: str
    ) -> LocalWriter:
        stored_ref = _read_text(ingest / "ref")
        data = ingest / "data"
        owner = self._ingest_owner(ingest)
        if stored_ref is not None and owner is not None and owner != self._scope.actor:
            raise FailedPrecondition(
                f"ingest ref {ref!r} belongs to {describe_all([owner])}")
        if stored_ref is not None and data.exists():
            if stored_ref != ref:
                raise Internal(f"ingest {ingest.name} holds ref {stored_ref!r}, not {ref!r}")
            fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
            try:
                offset = os.fstat(fd).st_size
                stored_total = int(_read_text(ingest / "total") or 0)
                if total and total != stored_total:
                    if offset > total:
                        raise FailedPrecondition(
                            f"ref {ref!r}: {offset} bytes already written, more than "
                            f"the new total of {total}"
                        )
                    _write_text(ingest / "total", str(total))
                    stored_total = total
                stored_expected = (_read_text(ingest / "expected") or "").strip()
                if expected and expected != stored_expected:
                    _write_text(ingest / "expected", expected)
                    stored_expected = expected
                started = _parse_time(_read_text(ingest / "startedat") or _fmt(_now()))
                hasher = _rehash(fd, offset)
            except BaseException:
                os.close(fd)
                raise
            return LocalWriter(self, ref, ingest, lock, fd, offset=offset, hasher=hasher,
                               total=stored_total, expected=stored_expected,
                               started_at=started)
        # a new ingest (or one whose creation a crash interrupted)
        with contextlib.suppress(FileNotFoundError):
            (ingest / "ref").unlink()
        started = _now()
        _write_text(ingest / "startedat", _fmt(started))
        _write_text(ingest / "updatedat", _fmt(started))
        _write_text(ingest / "total", str(total))
        _write_text(ingest / "expected", expected)
        _write_text(ingest / "owner", self._scope.actor)
        fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        crash.point("content.ingest.before-ref")
        try:
            atomic_write(ingest / "ref", ref.encode(), mode=0o600)
        except BaseException:
            os.close(fd)
            raise
        crash.point("content.ingest.created")
        return LocalWriter(self, ref, ingest, lock, fd, offset=0, hasher=sha256(),
                           total=total, expected=expected, started_at=started)

    def _commit_ingest(
        self, ingest: Path, digest: str, size: int, labels: dict[str, str]
    ) -> None:
        """Move a verified ingest's data into blobs/ and record it, atomically. A blob
        another owner holds gets the acting owner's reference instead (the ingest's
        bytes, verified to be the same, are then dropped with the ingest)."""
        target = self.blob_path(digest)
        data = ingest / "data"
        now = _fmt(_now())
        renamed = False
        try:
            with self._db.write() as conn:
                if conn.execute("SELECT 1 FROM blobs WHERE digest = ?", (digest,)).fetchone():
                    if self._scope.actor in self._refs(conn, digest):
                        raise AlreadyExists(f"content {digest} already exists")
                    self._add_ref(conn, digest, labels, now)
                    return
                os.chmod(data, BLOB_MODE)
                crash.point("content.commit.before-rename")
                os.replace(data, target)  # replaces a crash-orphaned copy, if any
                renamed = True
                crash.point("content.commit.renamed")
                fsync_dir(self.blobs_dir)
                conn.execute(
                    "INSERT INTO blobs (digest, size, created, updated) VALUES (?, ?, ?, ?)",
                    (digest, size, now, now),
                )
                self._add_ref(conn, digest, labels, now)
                crash.point("content.commit.inserted")
        except BaseException:
            # the body or the transaction's COMMIT failed (a full disk: the WAL
            # cannot grow): no record names the file, which must not stay
            if renamed:
                with contextlib.suppress(OSError):
                    target.unlink()
            raise
        crash.point("content.commit.committed")

    def _remove_ingest_dir(self, ingest: Path) -> None:
        """Remove an ingest directory whose lock the caller holds."""
        doomed = self.ingest_dir / f".del-{ingest.name}-{os.urandom(4).hex()}"
        try:
            os.rename(ingest, doomed)
        except FileNotFoundError:
            return
        crash.point("content.ingest.renamed-for-removal")
        remove_tree(doomed)

    def _forget_writer(self, w: LocalWriter) -> None:
        with self._lock:
            if self._writers.get(w.ref) is w:
                del self._writers[w.ref]

    def _read_status(self, ingest: Path) -> Status | None:
        ref = _read_text(ingest / "ref")
        if ref is None:
            return None
        try:
            started = _parse_time(_read_text(ingest / "startedat") or "")
        except ValueError:
            started = datetime.fromtimestamp(0, UTC)
        try:
            st = os.stat(ingest / "data")
            offset = st.st_size
            updated = max(started, datetime.fromtimestamp(st.st_mtime, UTC))
        except FileNotFoundError:
            offset, updated = 0, started
        try:
            total = int(_read_text(ingest / "total") or 0)
        except ValueError:
            total = 0
        expected = (_read_text(ingest / "expected") or "").strip()
        return Status(ref, offset, total, expected, started, updated)

    def _sees_ingest(self, ingest: Path) -> bool:
        owner = self._ingest_owner(ingest)
        return owner is None or self._scope.visible(owner)

    def status(self, ref: str) -> Status:
        _validate_ref(ref)
        ingest = self._ingest_path(ref)
        st = self._read_status(ingest)
        if st is None or st.ref != ref or not self._sees_ingest(ingest):
            raise NotFound(f"no ingest for ref {ref!r}")
        return st

    def list_statuses(self, *filters_: str) -> list[Status]:
        matcher = filters.parse(filters_)
        out: list[Status] = []
        for entry in sorted(os.listdir(self.ingest_dir)):
            if entry.startswith("."):
                continue
            st = self._read_status(self.ingest_dir / entry)
            if st is None or not self._sees_ingest(self.ingest_dir / entry):
                continue
            lookup = filters.make_lookup({
                "ref": st.ref, "expected": st.expected,
                "offset": str(st.offset), "total": str(st.total),
            })
            if matcher(lookup):
                out.append(st)
        out.sort(key=lambda s: s.ref)
        return out

    def abort(self, ref: str) -> None:
        _validate_ref(ref)
        ingest = self._ingest_path(ref)
        if not (ingest / "ref").exists() or not self._sees_ingest(ingest):
            raise NotFound(f"no ingest for ref {ref!r}")
        owner = self._ingest_owner(ingest)
        if owner is not None and owner != self._scope.actor:
            raise FailedPrecondition(
                f"cannot abort ingest ref {ref!r}: it belongs to {describe_all([owner])}")
        with self._lock:
            own = self._writers.get(ref)
        if own is not None:
            own._abort()
        lock = _Lock.try_acquire(ingest)
        if lock is None:
            raise Unavailable(_Lock.describe_holder(ingest, ref))
        try:
            if not (ingest / "ref").exists():
                raise NotFound(f"no ingest for ref {ref!r}")
            self._remove_ingest_dir(ingest)
        finally:
            lock.release()

    # ---------------------------------------------------------------- upkeep

    def cleanup(self, *, ingest_max_age: timedelta | None = None) -> CleanupReport:
        """Repair what crashes leave behind (see the module docs for the rules).

        Ingests held by a live writer are never touched. Re-hashing orphaned
        blobs happens inside the write transaction, so commits wait for it.
        """
        report = CleanupReport()
        for directory in (self.path, self.blobs_dir, self.ingest_dir):
            for entry in os.listdir(directory):
                path = directory / entry
                if entry.startswith(_TMP_PREFIXES):
                    if path.is_dir() and not path.is_symlink():
                        remove_tree(path)
                    else:
                        path.unlink(missing_ok=True)
                    report.removed_temp.append(str(path))
        now = time.time()
        for entry in sorted(os.listdir(self.ingest_dir)):
            ingest = self.ingest_dir / entry
            if entry.startswith(".") or not ingest.is_dir():
                continue
            lock = _Lock.try_acquire(ingest)
            if lock is None:
                continue
            try:
                for tmp in os.listdir(ingest):
                    if tmp.startswith(_TMP_PREFIXES):
                        (ingest / tmp).unlink(missing_ok=True)
                        report.removed_temp.append(str(ingest / tmp))
                ref = _read_text(ingest / "ref")
                data = ingest / "data"
                stale = False
                if ref is None or not data.exists():
                    stale = True
                elif ingest_max_age is not None:
                    stale = now - data.stat().st_mtime > ingest_max_age.total_seconds()
                if stale:
                    self._remove_ingest_dir(ingest)
                    report.removed_ingests.append(ref if ref is not None else entry)
            finally:
                lock.release()
        with self._db.write() as conn:
            rows = {d for (d,) in conn.execute("SELECT digest FROM blobs")}
            files = set(os.listdir(self.blobs_dir))
            for name in sorted(files):
                digest = f"{SHA256}:{name}"
                if digest in rows:
                    continue
                path = self.blobs_dir / name
                actual, size = ("", 0)
                if _HEX64.fullmatch(name) and path.is_file():
                    actual, size = digest_file(path)
                if actual == digest:
                    created = _fmt(datetime.fromtimestamp(path.stat().st_mtime, UTC))
                    conn.execute(
                        "INSERT INTO blobs (digest, size, created, updated, labels) "
                        "VALUES (?, ?, ?, ?, '{}')",
                        (digest, size, created, created),
                    )
                    hold(conn, digest, (CLI,))
                    with contextlib.suppress(OSError):
                        os.chmod(path, BLOB_MODE)
                    report.restored_rows.append(digest)
                else:
                    if path.is_dir():
                        remove_tree(path)
                    else:
                        path.unlink(missing_ok=True)
                    report.removed_blobs.append(str(path))
            for digest in sorted(rows):
                if digest.split(":", 1)[-1] not in files:
                    conn.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
                    report.removed_rows.append(digest)
            for (digest,) in conn.execute(
                    "SELECT digest FROM blobs WHERE digest NOT IN"
                    " (SELECT digest FROM blob_refs)").fetchall():
                hold(conn, digest, (CLI,))
                report.given_to_cli.append(digest)
            fsync_dir(self.blobs_dir)
        return report

    def close(self) -> None:
        if self._view_of is not None:
            return  # a scoped view: its store closes the shared state
        with self._lock:
            writers = list(self._writers.values())
        for w in writers:
            w.close()
        self._db.close()



def hold(conn: sqlite3.Connection, digest: str, owners: Iterable[str]) -> None:
    """Give ``owners`` a reference to blob ``digest`` (keeping references it has,
    labels copied from the row), for a blob whose holders are not recorded: the
    blobs of a root migrated from format 2 (:mod:`lamina.metadata.formats`), and a row
    that cleanup restores or finds unheld — the CLI's: a commit that a crash cut
    short never answered its writer, and containerd, which keeps its own record,
    writes the blob again, which adds its reference."""
    row = conn.execute("SELECT updated, labels FROM blobs WHERE digest = ?",
                       (digest,)).fetchone()
    if row is None:
        return
    conn.executemany(
        "INSERT OR IGNORE INTO blob_refs (digest, owner, updated, labels) VALUES (?,?,?,?)",
        [(digest, owner, row[0], row[1]) for owner in owners],
    )
