"""Recovery: the one step that makes a root fit for work, taken once by a process
before it works on the root (every ``lamina`` command, ``lamina serve``).

A plain :class:`~lamina.metadata.root.Root` repairs nothing behind its caller's
back, as containerd's ``metadata.NewDB`` does not: recovery is its own step, as
containerd's ``DB.Init`` and its start-up cleanup are. :class:`RecoveredRoot`
opens a root and

1. brings its format up to date (:func:`lamina.metadata.formats.open_format`:
   an older one is migrated, a newer one refused);
2. repairs it when the machine restarted since it was last used.

**After a restart.** The kernel's boot id is recorded in ``<root>/boot-id``.
When the recorded id differs from the current one, the machine restarted since
this root was last used — perhaps through a power cut in the middle of some
work. Before anything else uses it, the root is repaired the way ``lamina check
--repair`` does (stale temporary mounts, ingests and directories no metadata
names, rows whose files are gone, work directories of checkpoints and restores
the restart interrupted), without re-hashing every blob (a blob is fsynced
before it is renamed into place, so a power cut cannot leave a committed blob
with wrong bytes; ``lamina check`` verifies them when asked). One process does
it; the others wait for it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.fs.files import atomic_write, fsync_dir, locked, remove_tree
from lamina.fs.perms import FILE_MODE
from lamina.metadata.formats import open_format
from lamina.metadata.root import Root, make_root_dir
from lamina.metadata.workdirs import interrupted, root_work_dirs

if TYPE_CHECKING:
    from lamina.metadata.check import CheckReport

__all__ = ["BOOT_ID_FILE", "RecoveredRoot", "recover_after_restart"]

BOOT_ID_FILE = "boot-id"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class RecoveredRoot(Root):
    """A root opened for work: migrated to the current format and, with ``recover``,
    repaired after a restart (see the module docs); :attr:`recovered` is that
    repair's report, or None when there was nothing to repair."""

    def __init__(self, path: str | os.PathLike[str], *, async_remove: bool = False,
                 ahead: int = 0, recover: bool = True) -> None:
        where = Path(path)
        make_root_dir(where)  # the format lock lives in it
        found = open_format(where)
        super().__init__(where, async_remove=async_remove, ahead=ahead)
        self.format_found = found
        self.recovered = recover_after_restart(self) if recover else None


def _boot_id() -> str:
    try:
        return Path(_BOOT_ID).read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _drop_work_dirs(root: Root) -> list[str]:
    """No checkpoint or restore outlives the machine: every work directory left
    under the root was interrupted, and the task it may have paused died with the
    machine. Removed as ``check --repair`` does (what it did, in sentences)."""
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
            from lamina.metadata.check import check  # after a restart only (start-up time)

            report = check(root, repair=True, rehash=False)
            report.repaired += _drop_work_dirs(root)
        if recorded != current:
            atomic_write(marker, current.encode() + b"\n", mode=FILE_MODE)
        return report
