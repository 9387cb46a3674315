"""What the record stores (images, containers) share: one table keyed by name.

Each store keeps its records in one table of the root's metadata database:
a text key, the record's own columns, then the labels and the created and
updated times every record has; a record comes back from its row through the
store's ``_from_row``. Lookups, the sorted listing and deletion are the same for
every kind of record, and so is the error that names a missing one. A store
whose keys have several spellings (image names) says which in ``_spellings``:
a lookup finds the record under any of them.
"""

from __future__ import annotations

import builtins
import os
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar

from lamina.errors import Damaged, InvalidArgument, LaminaError, NotFound
from lamina.util.db import Database

__all__ = ["RecordStore", "record_schema", "time_from_ns"]

R = TypeVar("R")


def record_schema(table: str, key: str, *columns: str) -> str:
    """The table of a record store: text ``key``, then ``columns`` (each "name TYPE",
    all NOT NULL), then the labels (JSON) and times (ns) that every record has.
    ``_from_row`` reads a row in this order."""
    own = [*columns, "labels TEXT", "created_ns INTEGER", "updated_ns INTEGER"]
    lines = [f"    {key} TEXT PRIMARY KEY", *(f"    {c} NOT NULL" for c in own)]
    body = ",\n".join(lines)
    return f"\nCREATE TABLE IF NOT EXISTS {table} (\n{body}\n)\n"


def time_from_ns(ns: int) -> datetime:
    """A stored time (nanoseconds since the epoch) as an aware UTC datetime."""
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


class RecordStore(Generic[R]):
    """Records of one kind in table ``TABLE``, keyed by column ``KEY``."""

    SCHEMA: ClassVar[str]
    TABLE: ClassVar[str]
    KEY: ClassVar[str]
    #: What a record is called in errors ("image", "container").
    NOUN: ClassVar[str]

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._db = Database(path, self.SCHEMA)

    def _from_row(self, row: tuple[Any, ...]) -> R:
        raise NotImplementedError

    def _missing(self, key: str) -> NotFound:
        return NotFound(f"{self.NOUN} {key!r} does not exist")

    def _spellings(self, key: str) -> Sequence[str]:
        """The keys that name the same record as ``key``, ``key`` first."""
        return (key,)

    def _stored(self, c: sqlite3.Connection, key: str) -> str | None:
        """The key the record ``key`` is stored under (the first of its spellings
        that is), in the transaction ``c``; None when there is none."""
        keys = self._spellings(key)
        marks = ",".join("?" * len(keys))
        found = {row[0] for row in c.execute(
            f"SELECT {self.KEY} FROM {self.TABLE} WHERE {self.KEY} IN ({marks})", keys)}
        return next((k for k in keys if k in found), None)

    def _exists(self, c: sqlite3.Connection, key: str) -> bool:
        """Whether a record ``key`` exists, in the transaction ``c``."""
        return self._stored(c, key) is not None

    def _parsed(self, row: tuple[Any, ...]) -> R:
        """The record of ``row``; :class:`Damaged` for a row no lamina wrote:
        what it holds cannot be told, so nothing may act as if it were not there
        (gc would collect what it references)."""
        try:
            return self._from_row(row)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, OSError,
                InvalidArgument) as exc:
            why = exc.message if isinstance(exc, LaminaError) else str(exc)
            raise Damaged(
                f"{self.NOUN} {row[0]!r}: its record is damaged ({why}); remove it "
                f"('lamina {self.NOUN} rm') or import it again") from None

    def get(self, key: str) -> R:
        with self._db.read() as c:
            stored = self._stored(c, key)
            row = None if stored is None else c.execute(
                f"SELECT * FROM {self.TABLE} WHERE {self.KEY}=?", (stored,)).fetchone()
        if row is None:
            raise self._missing(key)
        return self._parsed(row)

    def list(self, *, skip_damaged: bool = False) -> list[R]:
        """Every record, sorted by key; a damaged one is :class:`Damaged`
        unless ``skip_damaged`` (what ``check`` lists, having reported it)."""
        records, damaged = self.readable()
        if damaged and not skip_damaged:
            raise damaged[0]
        return records

    def readable(self) -> tuple[builtins.list[R], builtins.list[Damaged]]:
        """Every record that reads, sorted by key, and the error of each damaged one."""
        with self._db.read() as c:
            rows = c.execute(f"SELECT * FROM {self.TABLE} ORDER BY {self.KEY}").fetchall()
        return Damaged.sort_out(rows, self._parsed)

    def damaged(self) -> builtins.list[tuple[str, str]]:
        """(key, message) of every damaged record."""
        with self._db.read() as c:
            rows = c.execute(f"SELECT * FROM {self.TABLE}").fetchall()
        return Damaged.among(rows, self._parsed)

    def delete(self, key: str) -> None:
        with self._db.write() as c:
            stored = self._stored(c, key)
            if stored is None:
                raise self._missing(key)
            c.execute(f"DELETE FROM {self.TABLE} WHERE {self.KEY}=?", (stored,))

    def close(self) -> None:
        self._db.close()
