"""Mount values and the real mount(2) calls behind them.

A :class:`Mount` is what a snapshotter hands out: the same four fields as
containerd's ``Mount`` message. :func:`mount_all` performs them on a target
directory and :func:`unmount_all` takes every mount off it again.

Overlay option strings longer than a page do not fit the classic mount(2)
data argument. Those are mounted through the new mount API (fsopen, fsconfig
with one ``lowerdir+`` per layer, fsmount, move_mount), so a stack of
overlayfs's maximum of 500 layers mounts with absolute paths.

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
ID-mapped by :mod:`lamina.mounts.idmap` (a container with a user namespace of its own).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shlex
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import Internal, InvalidArgument
from lamina.mounts.mountinfo import read_mountinfo

__all__ = [
    "Mount", "cleanup_temp_mounts", "is_mountpoint", "mount_all", "move_mount", "syscall",
    "temp_mount", "unmount_all",
]

_TEMP_PREFIX = "lamina-mount-"


@dataclass(frozen=True)
class Mount:
    """One mount: ``mount -t TYPE SOURCE TARGET -o OPTIONS``."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = field(default_factory=tuple)

    def command_line(self, target: str) -> str:
        """The ``mount`` command that performs this mount on ``target``."""
        words = ["mount", "-t", self.type, self.source, target]
        if self.options:
            words += ["-o", ",".join(self.options)]
        return " ".join(shlex.quote(w) for w in words)

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

_PAGE = os.sysconf("SC_PAGE_SIZE")

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

_FLAGS: dict[str, tuple[bool, int]] = {
    # option: (clear?, flag)
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "nosuid": (False, MS_NOSUID),
    "suid": (True, MS_NOSUID),
    "nodev": (False, MS_NODEV),
    "dev": (True, MS_NODEV),
    "noexec": (False, MS_NOEXEC),
    "exec": (True, MS_NOEXEC),
    "sync": (False, MS_SYNCHRONOUS),
    "async": (True, MS_SYNCHRONOUS),
    "dirsync": (False, MS_DIRSYNC),
    "noatime": (False, MS_NOATIME),
    "nodiratime": (False, MS_NODIRATIME),
    "relatime": (False, MS_RELATIME),
    "strictatime": (False, MS_STRICTATIME),
    "bind": (False, MS_BIND),
    "rbind": (False, MS_BIND | MS_REC),
    "remount": (False, MS_REMOUNT),
    "defaults": (False, 0),
}
_PROPAGATION = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
}

# new mount API (x86_64 / generic syscall numbers are the same for these)
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOUNT_ATTR = {MS_RDONLY: 0x1, MS_NOSUID: 0x2, MS_NODEV: 0x4, MS_NOEXEC: 0x8}
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100


def _os_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def syscall(nr: int, *args: Any, what: str) -> int:
    """The raw ``syscall(nr, *args)``: its result, or an OSError saying ``what`` failed."""
    rc = int(_libc.syscall(nr, *args))
    if rc < 0:
        raise _os_error(what)
    return rc


def move_mount(mfd: int, target: str) -> None:
    """Attach the detached mount ``mfd`` (from fsmount or open_tree) on ``target``."""
    syscall(_SYS_MOVE_MOUNT, mfd, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH,
            what=f"move_mount onto {target}")


def _parse(options: Sequence[str]) -> tuple[int, int, list[str]]:
    flags = 0
    propagation = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            clear, flag = _FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
        elif opt in _PROPAGATION:
            propagation |= _PROPAGATION[opt]
        else:
            data.append(opt)
    return flags, propagation, data


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    buf = data.encode() if data else None
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, buf)
    if rc != 0:
        raise _os_error(f"mount {fstype} {source} on {target}")


def _mount_new_api(m: Mount, target: str, flags: int, data: list[str]) -> None:
    """Mount through fsopen/fsconfig: every option is passed on its own."""
    fd = _libc.syscall(_SYS_FSOPEN, m.type.encode(), _FSOPEN_CLOEXEC)
    if fd < 0:
        raise _os_error(f"fsopen {m.type}")
    try:

        def conf(cmd: int, key: str | None, value: str | None) -> None:
            rc = _libc.syscall(
                _SYS_FSCONFIG,
                fd,
                cmd,
                key.encode() if key else None,
                value.encode() if value is not None else None,
                0,
            )
            if rc < 0:
                raise _os_error(f"fsconfig {key}={value}")

        conf(_FSCONFIG_SET_STRING, "source", m.source)
        for opt in data:
            k, eq, v = opt.partition("=")
            if k == "lowerdir" and eq:
                for layer in v.split(":"):
                    conf(_FSCONFIG_SET_STRING, "lowerdir+", layer)
            elif eq:
                conf(_FSCONFIG_SET_STRING, k, v)
            else:
                conf(_FSCONFIG_SET_FLAG, k, None)
        conf(_FSCONFIG_CMD_CREATE, None, None)
        attrs = 0
        for ms, attr in _MOUNT_ATTR.items():
            if flags & ms:
                attrs |= attr
        mfd = _libc.syscall(_SYS_FSMOUNT, fd, _FSMOUNT_CLOEXEC, attrs)
        if mfd < 0:
            raise _os_error("fsmount")
        try:
            rc = _libc.syscall(
                _SYS_MOVE_MOUNT, mfd, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH
            )
            if rc < 0:
                raise _os_error(f"move_mount onto {target}")
        finally:
            os.close(mfd)
    finally:
        os.close(fd)


def _restrictions(allow_suid: bool, allow_dev: bool) -> int:
    return (0 if allow_suid else MS_NOSUID) | (0 if allow_dev else MS_NODEV)


def _mount_one(m: Mount, target: str, restrict: int) -> None:
    flags, propagation, data = _parse(m.options)
    flags |= restrict
    joined = ",".join(data)
    if flags & MS_BIND:
        # A new bind mount takes none of the per-mount flags: remount to apply them.
        _sys_mount(m.source, target, "", flags & (MS_BIND | MS_REC), "")
        extra = flags & ~(MS_BIND | MS_REC | MS_REMOUNT)
        if extra:
            try:
                _sys_mount("", target, "", MS_REMOUNT | MS_BIND | extra, "")
            except OSError:
                with contextlib.suppress(OSError):
                    _unmount_once(target)
                raise
    elif len(joined) >= _PAGE - 1:
        _mount_new_api(m, target, flags, data)
    else:
        _sys_mount(m.source, target, m.type, flags, joined)
    if propagation:
        _sys_mount("", target, "", propagation, "")


def mount_all(
    mounts: Sequence[Mount], target: str | os.PathLike[str], *,
    allow_suid: bool = False, allow_dev: bool = False,
) -> None:
    """Perform ``mounts`` on ``target``, in order; undo them all on failure.

    Each mount is ``nosuid`` unless ``allow_suid`` and ``nodev`` unless
    ``allow_dev`` (whatever its options say); with both allowed, the mounts
    are performed exactly as their options say.
    """
    target = os.fspath(target)
    restrict = _restrictions(allow_suid, allow_dev)
    done = 0
    try:
        for m in mounts:
            dest = os.path.join(target, m.target.lstrip("/")) if m.target else target
            if any(o.startswith(("uidmap=", "gidmap=")) for o in m.options):
                from lamina.mounts.idmap import mount_idmapped  # containerd's ID-mapped mounts

                mount_idmapped(m, dest, allow_suid=allow_suid, allow_dev=allow_dev)
            else:
                _mount_one(m, dest, restrict)
            done += 1
    except OSError as exc:
        for _ in range(done):
            with contextlib.suppress(OSError):
                _unmount_once(target)
        if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
            raise InvalidArgument(str(exc)) from exc
        raise Internal(str(exc)) from exc


def _unmount_once(target: str) -> None:
    for attempt in range(50):
        if _libc.umount2(target.encode(), 0) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EBUSY or attempt == 49:
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
        time.sleep(0.05)


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the target of a mount (per /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    return any(m.mount_point == real for m in read_mountinfo())


def unmount_all(target: str | os.PathLike[str]) -> None:
    """Unmount everything stacked on ``target`` (nothing mounted is fine)."""
    target = os.fspath(target)
    while True:
        try:
            _unmount_once(target)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise Internal(str(exc)) from exc


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
