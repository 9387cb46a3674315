"""Work directories of checkpoints and restores, found again after a crash.

A checkpoint dumps CRIU's images into a directory under ``<root>/checkpoints``
and may pause the container's task meanwhile. The process that does so holds a
flock on the directory until it has removed it; a directory nobody holds was
left by a process that died (SIGKILL, OOM, power loss). Such a directory says
what the dead process left behind: its files, and — when a ``paused`` marker
names a container — a task it paused and never resumed, or — when a ``stopped``
marker does — a task its exiting dump stopped before the checkpoint was stored
(the dump is still there to restore it from).

Creating and locking happen under one more lock (a file the caller names,
outside the directory scanned), and so does :func:`interrupted`'s scan, so a
directory being created is never taken for an abandoned one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lamina.fs.files import fsync_dir, locked, remove_tree
from lamina.util.signals import deferred

__all__ = ["Interrupted", "interrupted", "mark_stopped", "paused", "root_work_dirs",
           "unmark_stopped", "work_dir"]

_PAUSED = "paused"
_STOPPED = "stopped"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def root_work_dirs(root: Path) -> tuple[Path, Path]:
    """Where the checkpoints and restores of the root at ``root`` work, and the lock
    that guards making a work directory there: ``(base, lock)``."""
    return root / "checkpoints", root / "locks" / "checkpoints"


@dataclass(frozen=True)
class Interrupted:
    """A work directory no live process holds; ``paused`` is the container whose task
    it paused and did not resume, ``stopped`` the one whose task its dump stopped
    ("" when none)."""

    path: Path
    paused: str
    stopped: str = ""


@contextlib.contextmanager
def work_dir(base: Path, name: str, *, lock: Path) -> Iterator[Path]:
    """``base/name``, made and flocked for the block, then removed; ``lock`` guards
    the making against :func:`interrupted`'s scan."""
    base.mkdir(mode=0o700, exist_ok=True)
    path = base / name
    with locked(lock):
        path.mkdir(mode=0o700)
        fd = os.open(path, _DIR_FLAGS)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield path
    finally:
        with deferred():  # not cut short by a SIGTERM
            with contextlib.suppress(OSError):
                remove_tree(path)
                # durable before the caller returns: else a power cut right after an
                # acknowledged checkpoint brings the directory back as interrupted
                fsync_dir(base)
            os.close(fd)


@contextlib.contextmanager
def paused(path: Path, cid: str) -> Iterator[None]:
    """Mark ``path`` as having paused ``cid``'s task for the block (the caller pauses
    and resumes inside it): a crash in between leaves the mark for recovery."""
    marker = path / _PAUSED
    marker.write_text(cid, encoding="utf-8")
    yield
    marker.unlink()


def mark_stopped(path: Path, cid: str) -> None:
    """Mark ``path`` as holding the dump that stopped ``cid``'s task, until
    :func:`unmark_stopped` (the checkpoint is stored): a crash in between leaves the
    mark for recovery."""
    (path / _STOPPED).write_text(cid, encoding="utf-8")


def unmark_stopped(path: Path) -> None:
    (path / _STOPPED).unlink()


def _marker(entry: Path, name: str) -> str:
    try:
        return (entry / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def interrupted(base: Path, *, lock: Path) -> list[Interrupted]:
    """The work directories under ``base`` that no live process holds."""
    if not base.is_dir():
        return []
    found = []
    with locked(lock):
        for entry in sorted(base.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                continue
            fd = os.open(entry, _DIR_FLAGS)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live checkpoint or restore
                found.append(Interrupted(entry, _marker(entry, _PAUSED),
                                         _marker(entry, _STOPPED)))
            finally:
                os.close(fd)
    return found
