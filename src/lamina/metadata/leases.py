"""Leases: time-bounded protection for work in progress.

A lease is a record ``(id, created, expires, labels)`` in the root's metadata
database. While a lease is unexpired, garbage collection keeps every object
(blob or snapshot) created at or after the lease's creation time — so an
import, unpack, diff or checkpoint that holds a lease cannot lose what it is
building to a concurrent ``gc``, even before anything references it.

Protection by creation time rather than by an explicit resource list is
deliberately conservative: it may keep a little more than needed while a
lease lives, never less, and it needs no bookkeeping in the hot paths. A
command that dies leaves its lease behind; the lease expires (one hour by
default) and stops protecting anything.

A lease may also name what it holds on to, the way ``ctr`` does: its
``containerd.io/gc.ref.content.*`` and ``containerd.io/gc.ref.snapshot.<sn>``
labels are references from the lease, followed by garbage collection while
the lease is unexpired (whenever those objects were created).

Work that *reuses* an existing object (an import finding a blob it needs
already stored, an unpack finding a layer's snapshot) records it as a lease
resource (:meth:`LeaseManager.add_resource`, done for a content store by
:class:`LeasedContent`) *before* relying on it. Garbage collection re-reads
the resources and removes blobs and snapshots while holding the metadata
database's write lock, so either it sees the resource and keeps the object,
or the object is gone by the time the work checks for it (and is made again,
under the lease).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

from lamina.content import ContentStore, Info, Status, Writer
from lamina.errors import AlreadyExists, Damaged, InvalidArgument, NotFound
from lamina.labels import PURPOSE, validate_labels
from lamina.util.db import Database

__all__ = ["DEFAULT_EXPIRY", "Lease", "LeaseManager", "LeasedContent", "parse_duration"]

DEFAULT_EXPIRY = timedelta(hours=1)
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")  # containerd's identifiers

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    created_ns INTEGER NOT NULL,
    expires_ns INTEGER,
    labels TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lease_resources (
    lease_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    ident TEXT NOT NULL,
    PRIMARY KEY (lease_id, kind, ident)
)
"""


@dataclass(frozen=True)
class Lease:
    id: str
    created: datetime
    expires: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def active(self, now: datetime | None = None) -> bool:
        return self.expires is None or self.expires > (now or datetime.now(UTC))


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h``, ``1d`` or a number of seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return timedelta(seconds=float(text[:-1]) * units[text[-1]])
        return timedelta(seconds=float(text))
    except ValueError:
        raise InvalidArgument(f"invalid duration {text!r} (use e.g. 90s, 10m, 2h)") from None


def _dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


def _lease(row: tuple[Any, ...]) -> Lease:
    """The lease of a row; Damaged for one no lamina wrote (gc, which keeps
    what leases hold, then stops rather than guess)."""
    lease_id, created, expires, labels = row
    try:
        parsed = json.loads(labels)
        if not isinstance(parsed, dict):
            raise ValueError(f"its labels {labels[:60]!r} are not an object")
        return Lease(lease_id, _dt(created), _dt(expires) if expires is not None else None,
                     parsed)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        raise Damaged(f"lease {lease_id!r}: its record is damaged ({exc}); remove it "
                            "('lamina lease rm')") from None


class LeaseManager:
    """Leases of one root."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._db = Database(path, _SCHEMA)

    def create(
        self,
        lease_id: str | None = None,
        *,
        expire: timedelta | None = DEFAULT_EXPIRY,
        labels: Mapping[str, str] | None = None,
    ) -> Lease:
        # os.urandom as secrets.token_hex does, without secrets' import of hmac and
        # OpenSSL (2-3 ms of every command that opens a root: startup)
        lease_id = lease_id or f"lease-{time.time_ns()}-{os.urandom(4).hex()}"
        if len(lease_id) > 76 or not _IDENTIFIER.fullmatch(lease_id):
            raise InvalidArgument(
                f"invalid lease id {lease_id!r}: letters and digits, separated by single "
                "'.', '_' or '-', at most 76 characters")
        if expire is not None and expire.total_seconds() < 0:
            raise InvalidArgument(f"invalid lease expiry {expire} (negative)")
        now = time.time_ns()
        expires = now + int(expire.total_seconds() * 1e9) if expire is not None else None
        clean = validate_labels(labels)
        with self._db.write() as c:
            if c.execute("SELECT 1 FROM leases WHERE id=?", (lease_id,)).fetchone():
                raise AlreadyExists(f"lease {lease_id!r} already exists")
            c.execute("INSERT INTO leases VALUES (?,?,?,?)",
                      (lease_id, now, expires, json.dumps(clean)))
        return Lease(lease_id, _dt(now), _dt(expires) if expires else None, clean)

    def list(self) -> list[Lease]:
        leases, damaged = self.readable()
        if damaged:
            raise damaged[0]
        return leases

    def readable(self) -> tuple[builtins.list[Lease], builtins.list[Damaged]]:
        """Every lease that reads, oldest first, and the error of each damaged one."""
        with self._db.read() as c:
            rows = c.execute("SELECT * FROM leases ORDER BY created_ns").fetchall()
        return Damaged.sort_out(rows, _lease)

    def damaged(self) -> builtins.list[tuple[str, str]]:
        """(id, message) of every lease whose record no lamina wrote."""
        with self._db.read() as c:
            return Damaged.among(c.execute("SELECT * FROM leases").fetchall(), _lease)

    def get(self, lease_id: str) -> Lease:
        with self._db.read() as c:
            row = c.execute("SELECT * FROM leases WHERE id=?", (lease_id,)).fetchone()
        if row is None:
            raise NotFound(f"lease {lease_id!r} does not exist")
        return _lease(row)

    def active(self) -> builtins.list[Lease]:
        """The unexpired leases, oldest first."""
        now = datetime.now(UTC)
        return [lease for lease in self.list() if lease.active(now)]

    def delete(self, lease_id: str) -> None:
        with self._db.write() as c:
            if c.execute("DELETE FROM leases WHERE id=?", (lease_id,)).rowcount == 0:
                raise NotFound(f"lease {lease_id!r} does not exist")
            c.execute("DELETE FROM lease_resources WHERE lease_id=?", (lease_id,))

    def add_resource(self, lease_id: str, kind: str, ident: str) -> None:
        """Record that lease ``lease_id`` uses ``ident`` (kind ``content`` or
        ``snapshot:<snapshotter>``): garbage collection keeps it while the lease lives."""
        self.add_resources(lease_id, kind, [ident])

    def add_resources(self, lease_id: str, kind: str, idents: Iterable[str]) -> None:
        """:meth:`add_resource` for each of ``idents``, in one transaction."""
        if kind != "content" and not kind.startswith("snapshot:"):
            raise InvalidArgument(f"invalid lease resource kind {kind!r}")
        with self._db.write() as c:
            if not c.execute("SELECT 1 FROM leases WHERE id=?", (lease_id,)).fetchone():
                raise NotFound(f"lease {lease_id!r} does not exist")
            c.executemany("INSERT OR IGNORE INTO lease_resources VALUES (?,?,?)",
                          [(lease_id, kind, ident) for ident in idents])

    def resources(self, lease_id: str) -> builtins.list[tuple[str, str]]:
        with self._db.read() as c:
            return [(k, i) for k, i in c.execute(
                "SELECT kind, ident FROM lease_resources WHERE lease_id=? ORDER BY kind, ident",
                (lease_id,))]

    def active_resources(self) -> builtins.list[tuple[str, str]]:
        """Resources of every unexpired lease."""
        now = time.time_ns()
        with self._db.read() as c:
            return sorted({(k, i) for k, i in c.execute(
                "SELECT r.kind, r.ident FROM lease_resources r JOIN leases l ON l.id = r.lease_id"
                " WHERE l.expires_ns IS NULL OR l.expires_ns > ?", (now,))})

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the metadata database's write lock (leases, images and containers
        cannot change meanwhile; reads still work). Used by garbage collection."""
        with self._db.write():
            yield

    def protected_since(self) -> datetime | None:
        """Creation time of the oldest unexpired lease: objects newer than it are kept."""
        active = [lease.created for lease in self.active()]
        return min(active) if active else None

    def expire_old(self) -> int:
        """Delete expired leases; returns how many."""
        now = time.time_ns()
        with self._db.write() as c:
            n: int = c.execute(
                "DELETE FROM leases WHERE expires_ns IS NOT NULL AND expires_ns <= ?",
                (now,)).rowcount
            c.execute("DELETE FROM lease_resources WHERE lease_id NOT IN (SELECT id FROM leases)")
            return n

    @contextlib.contextmanager
    def held(self, *, expire: timedelta = DEFAULT_EXPIRY, purpose: str = "") -> Iterator[Lease]:
        """A lease for the duration of a block (it expires by itself if the process dies)."""
        lease = self.create(expire=expire, labels={PURPOSE: purpose} if purpose
                            else None)
        try:
            yield lease
        finally:
            with contextlib.suppress(NotFound):
                self.delete(lease.id)

    def close(self) -> None:
        self._db.close()


class LeasedContent:
    """A content store that records every blob it is asked about as a resource
    of a lease, before answering: hand it to work that may reuse stored blobs."""

    def __init__(self, store: ContentStore, leases: LeaseManager, lease_id: str) -> None:
        self._store = store
        self._leases = leases
        self._lease_id = lease_id
        self._held: set[str] = set()  # recorded already: a lease keeps its resources

    def _use(self, digest: str) -> None:
        if digest and digest not in self._held:
            self._leases.add_resource(self._lease_id, "content", digest)
            self._held.add(digest)

    def hold(self, digests: Iterable[str]) -> None:
        """Record blobs that will be used, in one transaction instead of one each."""
        todo = sorted({d for d in digests if d and d not in self._held})
        if todo:
            self._leases.add_resources(self._lease_id, "content", todo)
            self._held.update(todo)

    def info(self, digest: str) -> Info:
        self._use(digest)
        return self._store.info(digest)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        self._use(info.digest)
        return self._store.update(info, *fieldpaths)

    def walk(self, *filters: str) -> Iterator[Info]:
        return self._store.walk(*filters)

    def delete(self, digest: str) -> None:
        self._store.delete(digest)

    def reader(self, digest: str) -> BinaryIO:
        self._use(digest)
        return self._store.reader(digest)

    def read_at(self, digest: str, offset: int, size: int) -> bytes:
        self._use(digest)
        return self._store.read_at(digest, offset, size)

    def writer(self, ref: str, *, total: int = 0, expected: str = "") -> Writer:
        self._use(expected)
        return _LeasedWriter(self._store.writer(ref, total=total, expected=expected), self)

    def status(self, ref: str) -> Status:
        return self._store.status(ref)

    def list_statuses(self, *filters: str) -> builtins.list[Status]:
        return self._store.list_statuses(*filters)

    def abort(self, ref: str) -> None:
        self._store.abort(ref)

    def close(self) -> None:
        """The wrapped store belongs to the caller: left open."""


class _LeasedWriter:
    def __init__(self, writer: Writer, owner: LeasedContent) -> None:
        self._w = writer
        self._owner = owner

    @property
    def offset(self) -> int:
        return self._w.offset

    def write(self, data: bytes) -> int:
        return self._w.write(data)

    def digest(self) -> str:
        return self._w.digest()

    def status(self) -> Status:
        return self._w.status()

    def commit(self, size: int, expected: str, *,
               labels: Mapping[str, str] | None = None) -> None:
        # AlreadyExists means the caller relies on the stored copy: lease it first
        self._owner._use(expected or self._w.digest())
        self._w.commit(size, expected, labels=labels)

    def truncate(self, size: int) -> None:
        self._w.truncate(size)

    def close(self) -> None:
        self._w.close()
