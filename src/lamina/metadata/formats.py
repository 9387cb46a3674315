"""What a root's format is and how an older one is brought up to date.

**Format versions.** A root records its format in ``<root>/format`` (JSON,
written atomically).

* a new, empty root is stamped with :data:`FORMAT` when it is first opened;
* a root without the file was made by lamina 0.1 (format 1);
* :func:`open_format` migrates an older format, one step at a time, under a
  lock: every step is idempotent and the new version is written only after the
  step is done, so a crash mid-way leaves the old version recorded and the next
  migration repeats the step. A plain open (:func:`check_format`, what
  :class:`~lamina.metadata.root.Root` runs) migrates nothing: it refuses a root
  that needs it (FailedPrecondition), and recovery
  (:mod:`lamina.metadata.recover`) migrates;
* a newer format is refused (FailedPrecondition): an older lamina must not
  write what it does not understand.

History:

1. lamina 0.1: root 0711, store directories 0755, databases 0644, blobs 0444;
   no format file.
2. everything owner-only (:mod:`lamina.fs.perms`), tightened once by the
   migration instead of at every open.
3. owners (:mod:`lamina.owners`): every snapshot has an owner and every blob
   one reference per owner holding it. A root that containerd (through
   ``lamina serve``) and the CLI already shared is repaired, not emptied:
   snapshot keys shaped like containerd's (``<namespace>/<digits>/...``)
   become containerd's and the rest the CLI's (a CLI snapshot the old code let
   stack on one of containerd's keeps it: a parent with children is never
   removed, whoever owns them). On a root that containerd used (it has
   snapshots of containerd's) every existing blob is held by both, so neither
   side's collection can take what the other may use (each side's collection
   then drops its own references to what it does not need); on any other
   root every blob is the CLI's.

A migration names the snapshotters that existed when its format was current
(:data:`_SNAPSHOTTERS`), not today's list: history does not change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lamina.errors import FailedPrecondition
from lamina.fs.files import atomic_write, locked
from lamina.fs.perms import FILE_MODE, tighten, tighten_tree
from lamina.util import crash

__all__ = ["FORMAT", "FORMAT_FILE", "check_format", "open_format"]

FORMAT = 3
FORMAT_FILE = "format"
# the snapshotters of formats 1 to 3 (lamina.metadata.root.SNAPSHOTTERS then)
_SNAPSHOTTERS = ("overlay", "native")


def _read_format(path: Path) -> int | None:
    try:
        obj = json.loads((path / FORMAT_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"{path / FORMAT_FILE}: unreadable root format: {exc}") from exc
    version = obj.get("format") if isinstance(obj, dict) else None
    if not isinstance(version, int) or version < 1:
        raise FailedPrecondition(f"{path / FORMAT_FILE}: unreadable root format {obj!r}")
    return version


def _write_format(path: Path, version: int) -> None:
    atomic_write(path / FORMAT_FILE, json.dumps({"format": version}).encode() + b"\n",
                 mode=FILE_MODE)


def _to_2(path: Path) -> None:
    """Owner-only modes (format 2): the root first, which alone closes it."""
    tighten(path)
    crash.point("format.2.root")
    names = ("snapshots", "content", "tmpmounts", "tasks", "checkpoints", "locks")
    dirs = [path / n for n in names] + [path / "snapshots" / n for n in _SNAPSHOTTERS]
    for d in dirs:
        tighten(d)
    dbs = [path / "metadata.db", path / "content" / "metadata.db"]
    dbs += [path / "snapshots" / n / "metadata.db" for n in _SNAPSHOTTERS]
    for db in dbs:
        for suffix in ("", "-wal", "-shm", "-journal"):
            tighten(f"{db}{suffix}", FILE_MODE)
    tighten_tree(path / "locks")


def _to_3(path: Path) -> None:
    """Owners (format 3): snapshot owners by key shape; blobs held by both on a root
    containerd used, else by the CLI."""
    from lamina.content.local import _SCHEMA as CONTENT_SCHEMA
    from lamina.content.local import hold
    from lamina.owners import CLI, CONTAINERD, OWNERS
    from lamina.snapshots.storage import add_owner_column
    from lamina.util.db import Database

    shared = False  # did containerd use this root (through serve)?
    for name in _SNAPSHOTTERS:
        db_path = path / "snapshots" / name / "metadata.db"
        if not db_path.is_file():
            continue
        db = Database(db_path, "")
        try:
            with db.write() as conn:
                if not conn.execute("SELECT 1 FROM sqlite_master WHERE name='snapshots'"
                                    ).fetchone():
                    continue
                if add_owner_column(conn):
                    _classify_snapshots(conn)
                theirs = conn.execute("SELECT 1 FROM snapshots WHERE owner=?", (CONTAINERD,))
                shared = shared or theirs.fetchone() is not None
        finally:
            db.close()
        crash.point("format.3.snapshots")
    content_db = path / "content" / "metadata.db"
    if content_db.is_file():
        db = Database(content_db, CONTENT_SCHEMA)
        owners = OWNERS if shared else (CLI,)
        try:
            with db.write() as conn:
                for (digest,) in conn.execute("SELECT digest FROM blobs").fetchall():
                    hold(conn, digest, owners)
        finally:
            db.close()
        crash.point("format.3.content")


def _classify_snapshots(conn: Any) -> None:
    """Keys shaped like containerd's become containerd's (see History)."""
    from lamina.owners import CONTAINERD, looks_like_containerd_key

    rows = conn.execute("SELECT id, key FROM snapshots").fetchall()
    conn.executemany("UPDATE snapshots SET owner=? WHERE id=?",
                     [(CONTAINERD, sid) for sid, key in rows if looks_like_containerd_key(key)])


#: ``MIGRATIONS[n]`` turns format ``n`` into ``n + 1``.
MIGRATIONS: dict[int, Callable[[Path], None]] = {1: _to_2, 2: _to_3}


def _refuse_newer(path: Path, found: int | None) -> None:
    if found is not None and found > FORMAT:
        raise FailedPrecondition(
            f"root {path} has format {found}, newer than this lamina understands "
            f"(up to {FORMAT}): use the lamina that made it, or a newer one")


# What lamina 0.1 made in a root, the last of which had no format file.
_LAMINA_ENTRIES = frozenset({"metadata.db", "snapshots", "content", "tmpmounts", "tasks",
                             "checkpoints"})


def _found_or_stamped(path: Path) -> int:
    """The format recorded; a root without one is new (stamped now) or from 0.1.
    Under the format lock."""
    found = _read_format(path)
    if found is None:
        # Only lamina's own entries make a 0.1 root: a directory holding other
        # things (a root made inside an existing directory) is new.
        found = 1 if _LAMINA_ENTRIES & set(os.listdir(path)) else FORMAT
        if found == FORMAT:
            _write_format(path, FORMAT)
    return found


def check_format(path: Path) -> int:
    """The format of the root at ``path``, which a plain open accepts only when it is
    :data:`FORMAT` (a new, empty root is stamped with it); FailedPrecondition for an
    older root (it needs :func:`open_format` first) or a newer one."""
    found = _read_format(path)
    if found is None:
        with locked(path / "locks" / "format"):
            found = _found_or_stamped(path)
    _refuse_newer(path, found)
    if found < FORMAT:
        raise FailedPrecondition(
            f"root {path} has format {found}, older than this lamina's ({FORMAT}): "
            "open it with recovery (lamina.metadata.recover; every lamina command does) "
            "to migrate it")
    return found


def open_format(path: Path) -> int:
    """Check and migrate the format of the root at ``path``; the format it had."""
    found = _read_format(path)
    if found == FORMAT:
        return found
    _refuse_newer(path, found)
    with locked(path / "locks" / "format"):
        found = _found_or_stamped(path)
        for step in range(found, FORMAT):
            MIGRATIONS[step](path)
            crash.point("format.step-done")
            _write_format(path, step + 1)
            crash.point("format.written")
    return found
