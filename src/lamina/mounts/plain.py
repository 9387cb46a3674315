"""Mount values, and performing them as given: mount(2), umount2 and the new mount API.

A :class:`Mount` is what a snapshotter hands out: the same four fields as
containerd's ``Mount`` message. :func:`mount_plain` performs mounts on a
target exactly as their options say (plus ``nosuid,nodev`` unless allowed),
:func:`unmount_all` takes every mount off a target again. ID mapping
(``uidmap=``/``gidmap=``) is not done here but one level up, in
:func:`lamina.mounts.mount.mount_all`, which hands such mounts to
:mod:`lamina.mounts.idmap`; the ID-mapped path itself mounts through this
module, so the two never import each other.

Overlay option strings longer than a page do not fit the classic mount(2)
data argument. Those are mounted through the new mount API (fsopen, fsconfig
with one ``lowerdir+`` per layer, fsmount, move_mount), so a stack of
overlayfs's maximum of 500 layers mounts with absolute paths.

``nosuid``/``nodev`` are mount flags (MS_NOSUID/MS_NODEV; MOUNT_ATTR_*
through fsmount), not filesystem options, so they are applied on both mount
paths and on bind mounts by a remount.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import Internal, InvalidArgument

__all__ = [
    "Mount", "mount_each", "mount_one", "mount_plain", "move_mount", "syscall", "unmount_all",
]


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
    fd = syscall(_SYS_FSOPEN, m.type.encode(), _FSOPEN_CLOEXEC, what=f"fsopen {m.type}")
    try:

        def conf(cmd: int, key: str | None, value: str | None) -> None:
            syscall(_SYS_FSCONFIG, fd, cmd, key.encode() if key else None,
                    value.encode() if value is not None else None, 0,
                    what=f"fsconfig {key}={value}")

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
        mfd = syscall(_SYS_FSMOUNT, fd, _FSMOUNT_CLOEXEC, attrs, what="fsmount")
        try:
            move_mount(mfd, target)
        finally:
            os.close(mfd)
    finally:
        os.close(fd)


def mount_one(m: Mount, target: str, *, allow_suid: bool = False,
              allow_dev: bool = False) -> None:
    """Perform ``m`` on ``target`` as its options say (``nosuid``/``nodev`` unless allowed)."""
    flags, propagation, data = _parse(m.options)
    flags |= (0 if allow_suid else MS_NOSUID) | (0 if allow_dev else MS_NODEV)
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


def _unmount_once(target: str) -> None:
    for attempt in range(50):
        if _libc.umount2(target.encode(), 0) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EBUSY or attempt == 49:
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
        time.sleep(0.05)


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


def mount_each(
    mounts: Sequence[Mount], target: str | os.PathLike[str],
    perform: Callable[[Mount, str], None],
) -> None:
    """``perform`` each of ``mounts`` on ``target`` (joined with the mount's own
    ``target``), in order; undo them all on failure. An OSError becomes
    InvalidArgument (a bad source, target or option) or Internal."""
    target = os.fspath(target)
    done = 0
    try:
        for m in mounts:
            perform(m, os.path.join(target, m.target.lstrip("/")) if m.target else target)
            done += 1
    except OSError as exc:
        for _ in range(done):
            with contextlib.suppress(OSError):
                _unmount_once(target)
        if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
            raise InvalidArgument(str(exc)) from exc
        raise Internal(str(exc)) from exc


def mount_plain(
    mounts: Sequence[Mount], target: str | os.PathLike[str], *,
    allow_suid: bool = False, allow_dev: bool = False,
) -> None:
    """:func:`mount_each` with :func:`mount_one`: no ID mapping."""

    def one(m: Mount, dest: str) -> None:
        mount_one(m, dest, allow_suid=allow_suid, allow_dev=allow_dev)

    mount_each(mounts, target, one)
