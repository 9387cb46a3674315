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
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from lamina.db import Database
from lamina.errors import AlreadyExists, InvalidArgument, NotFound
from lamina.labels import validate_labels

__all__ = ["DEFAULT_EXPIRY", "Lease", "LeaseManager", "parse_duration"]

DEFAULT_EXPIRY = timedelta(hours=1)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    created_ns INTEGER NOT NULL,
    expires_ns INTEGER,
    labels TEXT NOT NULL
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
        lease_id = lease_id or f"lease-{time.time_ns()}-{secrets.token_hex(4)}"
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
        with self._db.read() as c:
            rows = c.execute("SELECT * FROM leases ORDER BY created_ns").fetchall()
        return [Lease(i, _dt(cr), _dt(ex) if ex is not None else None, json.loads(lb))
                for i, cr, ex, lb in rows]

    def delete(self, lease_id: str) -> None:
        with self._db.write() as c:
            if c.execute("DELETE FROM leases WHERE id=?", (lease_id,)).rowcount == 0:
                raise NotFound(f"lease {lease_id!r} does not exist")

    def protected_since(self) -> datetime | None:
        """Creation time of the oldest unexpired lease: objects newer than it are kept."""
        now = datetime.now(UTC)
        active = [lease.created for lease in self.list() if lease.active(now)]
        return min(active) if active else None

    def expire_old(self) -> int:
        """Delete expired leases; returns how many."""
        now = time.time_ns()
        with self._db.write() as c:
            return c.execute("DELETE FROM leases WHERE expires_ns IS NOT NULL AND expires_ns <= ?",
                             (now,)).rowcount

    @contextlib.contextmanager
    def held(self, *, expire: timedelta = DEFAULT_EXPIRY, purpose: str = "") -> Iterator[Lease]:
        """A lease for the duration of a block (it expires by itself if the process dies)."""
        lease = self.create(expire=expire, labels={"lamina.io/purpose": purpose} if purpose
                            else None)
        try:
            yield lease
        finally:
            with contextlib.suppress(NotFound):
                self.delete(lease.id)

    def close(self) -> None:
        self._db.close()
