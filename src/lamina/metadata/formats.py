"""What a root's format is, how an older one is brought up to date, and what
happens when a root is opened after the machine restarted.

**Format versions.** A root records its format in ``<root>/format`` (JSON,
written atomically). Opening a root:

* a new, empty root is stamped with :data:`FORMAT`;
* a root without the file was made by lamina 0.1 (format 1);
* an older format is migrated, one step at a time, under a lock: every step
  is idempotent and the new version is written only after the step is done,
  so a crash mid-way leaves the old version recorded and the next open
  repeats the step;
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

**After a restart.** The kernel's boot id is recorded in ``<root>/boot-id``.
When a root is opened and the recorded id differs, the machine restarted
since this root was last used — perhaps through a power cut in the middle of
some work. Before anything else uses it, the root is repaired the way
``lamina check --repair`` does (stale temporary mounts, ingests and
directories no metadata names, rows whose files are gone, work directories
of checkpoints and restores the restart interrupted), without re-hashing
every blob (a blob is fsynced before it is renamed into place, so a power cut
cannot leave a committed blob with wrong bytes; ``lamina check`` verifies
them when asked). One process does it; the others wait for it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import FailedPrecondition
from lamina.fs.files import atomic_write, fsync_dir, locked, remove_tree
from lamina.fs.perms import FILE_MODE, tighten, tighten_tree
from lamina.util import crash

if TYPE_CHECKING:
    from lamina.metadata.check import CheckReport
    from lamina.metadata.root import Root

__all__ = ["BOOT_ID_FILE", "FORMAT", "FORMAT_FILE", "open_format", "recover_after_restart"]

FORMAT = 3
FORMAT_FILE = "format"
BOOT_ID_FILE = "boot-id"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


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
    from lamina.metadata.root import SNAPSHOTTERS

    tighten(path)
    crash.point("format.2.root")
    names = ("snapshots", "content", "tmpmounts", "tasks", "checkpoints", "locks")
    dirs = [path / n for n in names] + [path / "snapshots" / n for n in SNAPSHOTTERS]
    for d in dirs:
        tighten(d)
    dbs = [path / "metadata.db", path / "content" / "metadata.db"]
    dbs += [path / "snapshots" / n / "metadata.db" for n in SNAPSHOTTERS]
    for db in dbs:
        for suffix in ("", "-wal", "-shm", "-journal"):
            tighten(f"{db}{suffix}", FILE_MODE)
    tighten_tree(path / "locks")


def _to_3(path: Path) -> None:
    """Owners (format 3): snapshot owners by key shape; blobs held by both on a root
    containerd used, else by the CLI."""
    from lamina.content.local import _SCHEMA as CONTENT_SCHEMA
    from lamina.content.local import hold
    from lamina.metadata.root import SNAPSHOTTERS
    from lamina.owners import CLI, CONTAINERD, OWNERS
    from lamina.snapshots.storage import add_owner_column
    from lamina.util.db import Database

    shared = False  # did containerd use this root (through serve)?
    for name in SNAPSHOTTERS:
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


def open_format(path: Path) -> int:
    """Check (stamp, migrate) the format of the root at ``path``; the format it had."""
    found = _read_format(path)
    if found == FORMAT:
        return found
    if found is not None and found > FORMAT:
        raise FailedPrecondition(
            f"root {path} has format {found}, newer than this lamina understands "
            f"(up to {FORMAT}): use the lamina that made it, or a newer one")
    with locked(path / "locks" / "format"):
        found = _read_format(path)
        if found is None:
            others = {e for e in os.listdir(path)} - {"locks", FORMAT_FILE}
            found = 1 if others else FORMAT
        for step in range(found, FORMAT):
            MIGRATIONS[step](path)
            crash.point("format.step-done")
            _write_format(path, step + 1)
            crash.point("format.written")
        if found == FORMAT:
            _write_format(path, FORMAT)
    return found


def _boot_id() -> str:
    try:
        return Path(_BOOT_ID).read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _drop_work_dirs(root: Root) -> list[str]:
    """No checkpoint or restore outlives the machine: every work directory left
    under the root was interrupted, and the task it may have paused died with the
    machine. Removed as ``check --repair`` does (what it did, in sentences)."""
    from lamina.containers.workdirs import interrupted, root_work_dirs

    base, lock = root_work_dirs(root.path)
    done = []
    for left in interrupted(base, lock=lock):
        remove_tree(left.path)
        done.append(f"removed the work directory {left.path} of a checkpoint or restore "
                    "the restart interrupted")
    if done:
        fsync_dir(base)
    return done


def recover_after_restart(root: Root) -> CheckReport | None:
    """Repair ``root`` if the machine restarted since it was last used; the report
    of the repair, or None when there was nothing to do (see the module docs)."""
    current = _boot_id()
    marker = root.path / BOOT_ID_FILE
    with contextlib.suppress(OSError):
        if not current or marker.read_text(encoding="ascii").strip() == current:
            return None
    with locked(root.path / "locks" / "recover"):
        try:
            recorded = marker.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            recorded = ""
        report = None
        if recorded and recorded != current:
            from lamina.metadata.check import check

            report = check(root, repair=True, rehash=False)
            report.repaired += _drop_work_dirs(root)
        if recorded != current:
            atomic_write(marker, current.encode() + b"\n", mode=FILE_MODE)
        return report
