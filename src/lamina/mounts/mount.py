"""Mounting what snapshotters hand out, and temporary mounts.

A :class:`Mount` (:mod:`lamina.mounts.plain`, re-exported here) is what a
snapshotter hands out: the same four fields as containerd's ``Mount``
message. :func:`mount_all` performs them on a target directory and
:func:`unmount_all` takes every mount off it again.

Every mount is also ``nosuid,nodev`` unless the caller says otherwise: a
setuid binary or a device node an image carries must not act on the host
through a mount lamina makes to read or write that image (``image mount``,
``snapshot mount``, the temporary mounts of unpack, diff and the container
commands). These are mount flags (MS_NOSUID/MS_NODEV; MOUNT_ATTR_* through
fsmount), not filesystem options, so they are applied on both mount paths and
on bind mounts by a remount. Only the runtime mounting a container's root
filesystem opts out (``allow_suid``/``allow_dev``), as containerd's shim
mounts the snapshotter's mounts exactly as given.

A mount with containerd's ``uidmap=``/``gidmap=`` options is performed
ID-mapped by :mod:`lamina.mounts.idmap` (a container with a user namespace of
its own), which mounts through :mod:`lamina.mounts.plain` below both.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Sequence

from lamina.mounts.mountinfo import read_mountinfo
from lamina.mounts.plain import Mount, mount_each, mount_one, move_mount, syscall, unmount_all

__all__ = [
    "Mount", "cleanup_temp_mounts", "is_mountpoint", "mount_all", "move_mount", "syscall",
    "temp_mount", "unmount_all",
]

_TEMP_PREFIX = "lamina-mount-"


def mount_all(
    mounts: Sequence[Mount], target: str | os.PathLike[str], *,
    allow_suid: bool = False, allow_dev: bool = False,
) -> None:
    """Perform ``mounts`` on ``target``, in order; undo them all on failure.

    Each mount is ``nosuid`` unless ``allow_suid`` and ``nodev`` unless
    ``allow_dev`` (whatever its options say); with both allowed, the mounts
    are performed exactly as their options say. A mount with ``uidmap=``/
    ``gidmap=`` options goes to :func:`lamina.mounts.idmap.mount_idmapped`.
    """

    def one(m: Mount, dest: str) -> None:
        if any(o.startswith(("uidmap=", "gidmap=")) for o in m.options):
            # imported here: the snapshots protocol imports this module, so every
            # command would pay for the ID-mapping machinery at start-up
            from lamina.mounts.idmap import mount_idmapped

            mount_idmapped(m, dest, allow_suid=allow_suid, allow_dev=allow_dev)
        else:
            mount_one(m, dest, allow_suid=allow_suid, allow_dev=allow_dev)

    mount_each(mounts, target, one)


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the target of a mount (per /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    return any(m.mount_point == real for m in read_mountinfo())


@contextlib.contextmanager
def temp_mount(
    mounts: Sequence[Mount], *, base: str | os.PathLike[str] | None = None,
    allow_suid: bool = False, allow_dev: bool = False,
) -> Iterator[str]:
    """Mount ``mounts`` on a fresh temporary directory; unmount and remove it after.

    ``nosuid,nodev`` unless allowed, as with :func:`mount_all`.

    While mounted, ``<dir>.lock`` is flocked, so :func:`cleanup_temp_mounts`
    can tell a live temporary mount from one a killed process left behind.
    """
    if base is not None:
        os.makedirs(base, mode=0o700, exist_ok=True)
    # The lock exists, and is held, before the directory does: a concurrent
    # cleanup_temp_mounts never sees an unlocked live temporary mount.
    while True:
        lock, lock_path = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".lock", dir=base)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.fstat(lock).st_nlink:
            break
        os.close(lock)  # a cleanup took it for a leftover before we held it: again
    target = lock_path[: -len(".lock")]
    try:
        os.mkdir(target, 0o700)
        try:
            mount_all(mounts, target, allow_suid=allow_suid, allow_dev=allow_dev)
            try:
                yield target
            finally:
                unmount_all(target)
        finally:
            os.rmdir(target)
    finally:
        os.unlink(lock_path)
        os.close(lock)


def cleanup_temp_mounts(base: str | os.PathLike[str]) -> list[str]:
    """Unmount and remove temporary mounts under ``base`` that no live process holds
    (a process killed inside :func:`temp_mount` leaves its mount behind); returns them."""
    base = os.fspath(base)
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    cleaned = []
    for name in sorted(names):
        if not name.startswith(_TEMP_PREFIX):
            continue
        if name.endswith(".lock"):  # a lock whose directory never came or is gone
            if not os.path.lexists(os.path.join(base, name[: -len(".lock")])):
                _remove_unheld_lock(os.path.join(base, name))
            continue
        target = os.path.join(base, name)
        try:
            lock = os.open(target + ".lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            lock = -1  # its owner is gone (the lock goes last): stale
        try:
            if lock >= 0:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use
                if not os.path.lexists(target):
                    continue  # its owner finished meanwhile
            unmount_all(target)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(target)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target + ".lock")
            cleaned.append(target)
        finally:
            if lock >= 0:
                os.close(lock)
    return cleaned


def _remove_unheld_lock(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except BlockingIOError:
        pass  # being set up by a live temp_mount
    finally:
        os.close(fd)
