"""Snapshot metadata shared by every snapshotter: one SQLite file per snapshotter.

Rows carry an internal integer id, which names the snapshot's directory on
disk; the user's key is only ever a column, so any string is a valid key.
A committed snapshot keeps the id (and so the directory) of the active
snapshot it was committed from.

All checks that make an operation valid (does the key exist, is the parent
committed, has the snapshot children) happen inside the write transaction
that performs it, so two processes cannot both pass them.

Every row has an owner (:mod:`lamina.owners`); a transaction works in a
:class:`~lamina.owners.Scope`: lookups by key find only rows the scope sees,
new rows belong to its actor, and changing a row the actor does not own is
FailedPrecondition. Keys are unique across owners, and a snapshot's parent
has its owner.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lamina.errors import (
    AlreadyExists,
    Damaged,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from lamina.labels import update_labels, validate_labels
from lamina.owners import CLI_VIEW, Scope, describe
from lamina.snapshots import MAX_KEY_SIZE, Info, Kind, Usage
from lamina.util.db import Database

__all__ = ["MetaStore", "Snapshot", "Transaction", "add_owner_column", "validate_labels"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER,
    inodes INTEGER,
    owner TEXT NOT NULL DEFAULT 'lamina'
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, key)
)
"""


@dataclass(frozen=True)
class Snapshot:
    """What a snapshotter needs to build mounts: its id, kind, and parent ids."""

    id: str
    kind: Kind
    parent_ids: tuple[str, ...]  # nearest parent first


# A snapshot's ancestors, nearest first (``depth`` orders them; the chain is a path).
# Bounded: rows edited by hand into a loop end the walk instead of running forever.
_CHAIN_SQL = """
WITH RECURSIVE chain(id, parent_id, depth) AS (
    SELECT id, parent_id, 0 FROM snapshots WHERE id=?
    UNION ALL
    SELECT s.id, s.parent_id, chain.depth + 1 FROM snapshots s JOIN chain ON s.id = chain.parent_id
    WHERE chain.depth < ?
)
SELECT id FROM chain ORDER BY depth
"""
_KINDS = frozenset(k.value for k in Kind)

_CHAIN_BOUND = 1 << 16
"""More ancestors than any snapshot can have (its snapshotter limits it far below)."""

_SEEN: dict[Scope, tuple[str, tuple[str, ...]]] = {}


def _seen_sql(scope: Scope) -> tuple[str, tuple[str, ...]]:
    """``scope.sql()``, built once per scope (every transaction asks)."""
    seen = _SEEN.get(scope)
    if seen is None:
        seen = _SEEN[scope] = scope.sql()
    return seen


def _dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


class Transaction:
    """Operations on the metadata inside one open transaction."""

    def __init__(self, conn: sqlite3.Connection, scope: Scope = CLI_VIEW,
                 db: Database | None = None) -> None:
        self._c = conn
        self._scope = scope
        self._seen, self._seen_args = _seen_sql(scope)
        self._db = db

    def sync_before_commit(self, directory: str | os.PathLike[str]) -> None:
        """fsync ``directory`` before this transaction commits (one fsync for all
        the transactions a group commit joins): a rename in it made here is durable
        before the row that names it."""
        if self._db is None:
            raise RuntimeError("sync_before_commit outside a write transaction")
        self._db.sync_before_commit(directory)

    # -- lookups -----------------------------------------------------------
    def _row(self, key: str) -> tuple[int, str, str, int | None, int, int]:
        r = self._owned_row(key)
        return (r[0], r[1], r[2], r[3], r[4], r[5])

    def _owned_row(self, key: str) -> tuple[int, str, str, int | None, int, int, str]:
        row = self._c.execute(
            "SELECT id, key, kind, parent_id, created_ns, updated_ns, owner FROM snapshots"
            f" WHERE key=? AND {self._seen}",
            (key, *self._seen_args),
        ).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return (row[0], row[1], row[2], row[3], row[4], row[5], row[6])

    def _mine(self, key: str, what: str) -> tuple[int, str, str, int | None, int, int]:
        """``key``'s row, which the acting owner must own (FailedPrecondition if not)."""
        row = self._owned_row(key)
        if row[6] != self._scope.actor:
            raise FailedPrecondition(
                f"cannot {what} snapshot {key!r}: it belongs to {describe(row[6], key)}, "
                f"which alone may change it")
        return (row[0], row[1], row[2], row[3], row[4], row[5])

    def owners(self) -> dict[str, str]:
        """Owner of every snapshot the scope sees, by key."""
        return dict(self._c.execute(
            f"SELECT key, owner FROM snapshots WHERE {self._seen}", self._seen_args))

    def _labels(self, sid: int, key: str) -> dict[str, str]:
        """Snapshot ``key``'s labels; :class:`Damaged` for a label row no snapshotter
        wrote (a name or value that is not text: what it meant cannot be told)."""
        rows = self._c.execute("SELECT key, value FROM labels WHERE snapshot_id=?",
                               (sid,)).fetchall()
        for name, value in rows:
            if (flaw := _label_flaw(name, value)) is not None:
                raise Damaged(f"snapshot {key!r}: {flaw} in the metadata: the metadata "
                              "is damaged")
        return dict(rows)

    def _chain(self, parent_id: int | None) -> tuple[str, ...]:
        """``parent_id`` and its ancestors, nearest first: one query at any depth (an
        image's snapshots are tens of layers deep, and each call walks the chain)."""
        if parent_id is None:
            return ()
        chain = tuple(str(r[0]) for r in self._c.execute(_CHAIN_SQL, (parent_id, _CHAIN_BOUND)))
        if len(chain) > _CHAIN_BOUND:
            raise Internal(f"snapshot {chain[0]}'s parents form a loop in the metadata "
                           f"(more than {_CHAIN_BOUND} ancestors): the metadata is damaged")
        return chain

    def _parent_key(self, sid: int | None, child: str) -> str:
        """The key of ``child``'s parent, row ``sid`` ("" for none); :class:`Damaged`
        when no row has that id."""
        if sid is None:
            return ""
        row = self._c.execute("SELECT key FROM snapshots WHERE id=?", (sid,)).fetchone()
        if row is None:
            raise Damaged(f"snapshot {child!r}: its parent (id {sid}) does not exist in the "
                          "metadata: the metadata is damaged")
        return str(row[0])

    def info(self, key: str) -> Info:
        sid, k, kind, parent_id, created, updated = self._row(key)
        return Info(
            kind=_kind(kind, k, created, updated),
            name=k,
            parent=self._parent_key(parent_id, k),
            labels=self._labels(sid, k),
            created=_dt(created),
            updated=_dt(updated),
        )

    def sid(self, key: str) -> str:
        """``key``'s row id (its directory's name), its ancestors not read."""
        return str(self._row(key)[0])

    def damage(self) -> list[tuple[str, str]]:
        """Rows no snapshotter wrote, as (subject, what is wrong): an unknown kind, a
        time or a recorded usage that is not one, a parent that is not there or not
        committed, parents that form a loop. One bounded pass over every row."""
        rows = self._c.execute("SELECT id, key, kind, parent_id, created_ns, updated_ns, "
                               "size, inodes FROM snapshots").fetchall()
        parent = {r[0]: r[3] for r in rows}
        keys = {r[0]: str(r[1]) for r in rows}
        kinds = {r[0]: r[2] for r in rows}
        found: list[tuple[str, str]] = []
        for _, key, kind, pid, created, updated, size, inodes in rows:
            if (flaw := _flaw(kind, created, updated)) is not None:
                found.append((str(key), flaw))
            if size is not None and not _counts(size, inodes):
                found.append((str(key), f"its recorded usage {size!r}, {inodes!r} is not one"))
            if pid is not None and pid not in parent:
                found.append((str(key), f"its parent (id {pid}) does not exist"))
            elif pid is not None and kinds[pid] != Kind.COMMITTED.value:
                found.append((str(key), f"its parent {keys[pid]!r} is not committed"))
        for sid, name, value in self._c.execute(
                "SELECT snapshot_id, key, value FROM labels"):
            if sid not in keys:
                found.append((f"id {sid}", f"a label row ({name!r}) names a snapshot that "
                              "does not exist (a new snapshot given this id would take it)"))
            elif (flaw := _label_flaw(name, value)) is not None:
                found.append((keys[sid], flaw))
        state: dict[int, int] = {}  # 1: on the path being walked, 2: done
        for start in parent:
            path: list[int] = []
            node: int | None = start
            while node is not None and node in parent and node not in state:
                state[node] = 1
                path.append(node)
                node = parent[node]
            if node is not None and state.get(node) == 1:  # back on this walk's path
                loop = [keys[n] for n in path[path.index(node):]]
                found.append((", ".join(loop), "their parents form a loop"))
            for n in path:
                state[n] = 2
        return found

    def snapshot(self, key: str) -> Snapshot:
        sid, _, kind, parent_id, created, updated = self._row(key)
        return Snapshot(id=str(sid), kind=_kind(kind, key, created, updated),
                        parent_ids=self._chain(parent_id))

    def resolve_parent(
        self, parent: str, *, max_depth: int | None = None,
    ) -> tuple[int | None, tuple[str, ...]]:
        """The parent's row id and its chain (itself first); checks it is committed,
        and, with ``max_depth``, that a snapshot on it has at most that many ancestors."""
        if not parent:
            return None, ()
        try:
            sid, _, kind, parent_id, _, _, owner = self._owned_row(parent)
        except NotFound:
            raise NotFound(f"parent snapshot {parent!r} does not exist") from None
        if owner != self._scope.actor:
            raise FailedPrecondition(
                f"parent snapshot {parent!r} belongs to {describe(owner, parent)}: "
                f"snapshots are not shared between owners")
        if kind != Kind.COMMITTED.value:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot (it is {kind})")
        chain = (str(sid), *self._chain(parent_id))
        if max_depth is not None and len(chain) > max_depth:
            raise ResourceExhausted(
                f"parent snapshot {parent!r} is {len(chain)} layers deep: a snapshot on it "
                f"would stack more than {max_depth} layers, this snapshotter's limit")
        return sid, chain

    def check_new_key(self, key: str) -> None:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        if (size := len(key.encode("utf-8", "surrogatepass"))) > MAX_KEY_SIZE:
            raise InvalidArgument(f"snapshot key {key[:64]!r}… is {size} bytes, more than "
                                  f"the limit of {MAX_KEY_SIZE}")
        row = self._c.execute("SELECT owner FROM snapshots WHERE key=?", (key,)).fetchone()
        if row is not None:
            whose = "" if row[0] == self._scope.actor else f" (it belongs to {describe(row[0])})"
            raise AlreadyExists(f"snapshot {key!r} already exists{whose}")

    def ids(self) -> set[str]:
        return {str(r[0]) for r in self._c.execute("SELECT id FROM snapshots")}

    def reserve_ids(self, count: int) -> list[str]:
        """Move the id sequence on by ``count`` and return the ids it passed over:
        no snapshot is given one of them unless :meth:`create` is asked for it, so
        directories named after them can be made before their rows exist."""
        row = self._c.execute("SELECT seq FROM sqlite_sequence WHERE name='snapshots'").fetchone()
        (top,) = self._c.execute("SELECT coalesce(max(id), 0) FROM snapshots").fetchone()
        first = max(int(top), int(row[0]) if row else 0) + 1
        last = first + count - 1
        if row is None:
            self._c.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('snapshots', ?)",
                            (last,))
        else:
            self._c.execute("UPDATE sqlite_sequence SET seq=? WHERE name='snapshots'", (last,))
        return [str(i) for i in range(first, last + 1)]

    # -- changes -----------------------------------------------------------
    def create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None,
        *, sid: str | None = None,
    ) -> Snapshot:
        """Insert an active snapshot or view; validates key, parent and labels.
        ``sid``: the id to give it, one :meth:`reserve_ids` returned (else a new one)."""
        if kind is Kind.COMMITTED:
            raise InvalidArgument("committed snapshots are made by commit")
        clean = validate_labels(labels)
        self.check_new_key(key)
        parent_id, chain = self.resolve_parent(parent)
        now = time.time_ns()
        cur = self._c.execute(
            "INSERT INTO snapshots (id, key, kind, parent_id, created_ns, updated_ns, owner)"
            " VALUES (?,?,?,?,?,?,?)",
            (None if sid is None else int(sid), key, kind.value, parent_id, now, now,
             self._scope.actor),
        )
        rowid = cur.lastrowid
        assert rowid is not None
        # the id is new (AUTOINCREMENT), but a label row left by a hand-edited database
        # (with foreign keys off) may name it: it is no label of this snapshot's
        self._set_labels(rowid, clean)
        return Snapshot(id=str(rowid), kind=kind, parent_ids=chain)

    def _set_labels(self, sid: int, labels: Mapping[str, str]) -> None:
        self._c.execute("DELETE FROM labels WHERE snapshot_id=?", (sid,))
        self._add_labels(sid, labels)

    def _add_labels(self, sid: int, labels: Mapping[str, str]) -> None:
        if labels:
            self._c.executemany(
                "INSERT INTO labels (snapshot_id, key, value) VALUES (?,?,?)",
                [(sid, k, v) for k, v in labels.items()],
            )

    def commit(
        self, name: str, key: str, usage: Usage, labels: Mapping[str, str] | None
    ) -> Snapshot:
        """Turn active ``key`` into committed ``name`` (same id, same directory)."""
        clean = validate_labels(labels)
        sid, _, kind, parent_id, _, _ = self._mine(key, "commit")
        if kind != Kind.ACTIVE.value:
            raise FailedPrecondition(f"snapshot {key!r} is a {kind}, only active ones commit")
        self.check_new_key(name)
        now = time.time_ns()
        self._c.execute(
            "UPDATE snapshots SET key=?, kind=?, created_ns=?, updated_ns=?, size=?, inodes=?"
            " WHERE id=?",
            (name, Kind.COMMITTED.value, now, now, usage.size, usage.inodes, sid),
        )
        self._set_labels(sid, clean)
        return Snapshot(id=str(sid), kind=Kind.COMMITTED, parent_ids=self._chain(parent_id))

    def remove(self, key: str) -> str:
        """Delete ``key``'s row and return its id; FailedPrecondition while it has
        children. Its ancestors are not read: a row whose parents were damaged into
        a loop can still go."""
        sid, *_ = self._mine(key, "remove")
        child = self._c.execute(
            "SELECT key FROM snapshots WHERE parent_id=? LIMIT 1", (sid,)
        ).fetchone()
        if child is not None:
            raise FailedPrecondition(
                f"cannot remove snapshot {key!r}: it has children (e.g. {child[0]!r})"
            )
        self._c.execute("DELETE FROM snapshots WHERE id=?", (sid,))
        return str(sid)

    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        sid, *_ = self._mine(info.name, "update")
        labels = update_labels(self._labels(sid, info.name), validate_labels(info.labels),
                               fieldpaths,
                               what=f"snapshot {info.name!r}")
        self._set_labels(sid, labels)
        self._c.execute("UPDATE snapshots SET updated_ns=? WHERE id=?", (time.time_ns(), sid))
        return self.info(info.name)

    def stored_usage(self, key: str) -> Usage | None:
        row = self._c.execute(
            f"SELECT size, inodes FROM snapshots WHERE key=? AND {self._seen}",
            (key, *self._seen_args),
        ).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        if row[0] is None or not _counts(row[0], row[1]):
            return None  # not recorded, or damaged (check reports it): measured instead
        return Usage(size=int(row[0]), inodes=int(row[1]))

    def recorded(self, sid: str) -> tuple[str, Usage | None]:
        """Snapshot ``sid``'s key and the usage recorded when it was committed
        (None before it was, or if it never was measured)."""
        row = self._c.execute("SELECT key, size, inodes FROM snapshots WHERE id=?",
                              (int(sid),)).fetchone()
        if row is None:
            raise NotFound(f"snapshot id {sid} does not exist")
        key, size, inodes = row
        if size is None or not _counts(size, inodes):
            return str(key), None  # unrecorded, or damaged (check reports it)
        return str(key), Usage(size=int(size), inodes=int(inodes))

    def _rows_and_labels(self) -> tuple[list[tuple[Any, ...]], dict[int, str],
                                        dict[int, dict[str, str]], set[int]]:
        """One read of what walks are made of: the rows in scope (id, key, kind,
        parent id, times), every row's key by id, the labels that are text by row,
        and the rows with a label that is not."""
        keys = dict(self._c.execute("SELECT id, key FROM snapshots"))
        rows = self._c.execute(
            "SELECT id, key, kind, parent_id, created_ns, updated_ns FROM snapshots"
            f" WHERE {self._seen} ORDER BY id", self._seen_args,
        ).fetchall()
        labels: dict[int, dict[str, str]] = {}
        damaged: set[int] = set()
        for sid, k, v in self._c.execute("SELECT snapshot_id, key, value FROM labels"):
            if _label_flaw(k, v) is None:
                labels.setdefault(sid, {})[k] = v
            else:
                damaged.add(sid)
        return rows, keys, labels, damaged

    def all_infos(self) -> list[Info]:
        """Every snapshot, in three queries (walk over many snapshots stays cheap).
        A damaged row is left out (check reports it), as is one with a damaged label:
        read without it, it would be collected where the label may keep it."""
        rows, keys, labels, damaged = self._rows_and_labels()
        return [
            Info(
                kind=Kind(kind),
                name=key,
                parent=keys.get(parent_id, "") if parent_id is not None else "",
                labels=labels.get(sid, {}),
                created=_dt(created),
                updated=_dt(updated),
            )
            for sid, key, kind, parent_id, created, updated in rows
            if _flaw(kind, created, updated) is None and sid not in damaged
        ]

    def damaged_holds(self) -> list[tuple[str, str, dict[str, str]]]:
        """The rows :meth:`all_infos` leaves out, as far as they read (see
        :class:`lamina.snapshots.DamagedRows`)."""
        rows, keys, labels, damaged = self._rows_and_labels()
        return [
            (str(key), keys.get(parent_id, "") if parent_id is not None else "",
             labels.get(sid, {}))
            for sid, key, kind, parent_id, created, updated in rows
            if _flaw(kind, created, updated) is not None or sid in damaged
        ]


def _flaw(kind: object, created: object, updated: object) -> str | None:
    """What is wrong with a row's own fields (None when nothing)."""
    if kind not in _KINDS:
        return f"its kind {kind!r} is unknown"
    for what, ns in (("creation", created), ("update", updated)):
        if not _counts(ns):
            return f"its {what} time {ns!r} is not a time"
    return None


def _label_flaw(name: object, value: object) -> str | None:
    """What is wrong with a label row (None when nothing): both are text."""
    if not isinstance(name, str):
        return f"its label name {name!r} is not text"
    if not isinstance(value, str):
        return f"its label {name!r} has a value that is not text ({value!r})"
    return None


def _counts(*values: object) -> bool:
    return all(isinstance(v, int) and 0 <= v < 1 << 63 for v in values)


def _kind(value: str, key: str, created: object, updated: object) -> Kind:
    """The kind of a row whose fields are sound; Internal for a damaged one."""
    flaw = _flaw(value, created, updated)
    if flaw is not None:
        raise Damaged(f"snapshot {key!r}: {flaw} in the metadata: the metadata is damaged")
    return Kind(value)


class MetaStore:
    """The metadata database of one snapshotter."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # Group commit: concurrent calls of a server share a WAL fsync (and the
        # snapshots directory's fsync) instead of taking turns at one each.
        self._db = Database(path, _SCHEMA, group_commit=True)

    @contextmanager
    def write(self, scope: Scope = CLI_VIEW) -> Iterator[Transaction]:
        with self._db.write() as conn:
            yield Transaction(conn, scope, self._db)

    @contextmanager
    def read(self, scope: Scope = CLI_VIEW) -> Iterator[Transaction]:
        with self._db.read() as conn:
            yield Transaction(conn, scope)

    def close(self) -> None:
        self._db.close()


def add_owner_column(conn: sqlite3.Connection) -> bool:
    """Give a snapshots table of an older format its ``owner`` column (every row
    the CLI's); False when it had one already. Part of a root migration."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(snapshots)")}
    if "owner" in columns:
        return False
    conn.execute("ALTER TABLE snapshots ADD COLUMN owner TEXT NOT NULL DEFAULT 'lamina'")
    return True
