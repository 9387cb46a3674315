"""EROFS image files mounted read-only: file-backed where the kernel can, else a loop device.

Linux 6.12 and later mount an EROFS image straight from a regular file
(``CONFIG_EROFS_FS_BACKED_BY_FILE``); older kernels (bookworm's 6.1) need a
block device, so the image is attached to a free loop device first
(``LOOP_CONFIGURE``, read-only, auto-clear: the device goes when the mount
does). ``backing`` picks one: ``"auto"`` tries the file and falls back to a
loop device when the kernel wants a block device (ENOTBLK), ``"file"`` and
``"loop"`` force one (tests force the loop path).

Every mount is ``ro,nosuid,nodev``. Where EROFS cannot be mounted at all the
error is one line naming the cause: no EROFS in the kernel, or a process in a
user namespace (the kernel mounts EROFS only for the initial namespace's root;
rootless lamina keeps overlay).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import time

from lamina import rootless
from lamina.errors import Internal, LaminaError, Unavailable
from lamina.mounts.mount import Mount, mount_all

__all__ = ["BACKINGS", "is_mounted", "mount_image", "unmount_image"]

BACKINGS = ("auto", "file", "loop")

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
_LOOP_INFO64_SIZE = 232
_LO_FLAGS_OFFSET = 52  # lo_flags within struct loop_info64
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def is_mounted(target: str | os.PathLike[str]) -> bool:
    """Whether something is mounted on directory ``target`` (it is on another device
    than its parent: cheaper than reading the mount table for every layer)."""
    path = os.path.abspath(target)
    try:
        return os.stat(path).st_dev != os.stat(os.path.dirname(path)).st_dev
    except FileNotFoundError:
        return False


def _unavailable(image: str, exc: OSError) -> LaminaError:
    if rootless.active() or exc.errno == errno.EPERM:
        return Unavailable("EROFS cannot be mounted in a user namespace "
                           "(rootless lamina keeps the overlay snapshotter)")
    if exc.errno == errno.ENODEV:
        return Unavailable("this kernel has no EROFS (CONFIG_EROFS_FS; try modprobe erofs)")
    return Internal(f"mount EROFS image {image}: {exc.strerror or exc}")


def _mount(source: str, target: str) -> None:
    try:
        mount_all([Mount("erofs", source, options=("ro",))], target)
    except LaminaError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError):
            raise cause from None
        raise


def _attach_loop(image: str) -> tuple[int, str]:
    """A loop device's fd and path with ``image`` attached read-only (detached on last close)."""
    backing = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = bytearray(_LOOP_INFO64_SIZE)
        struct.pack_into("<I", info, _LO_FLAGS_OFFSET, _LO_FLAGS_READ_ONLY | _LO_FLAGS_AUTOCLEAR)
        config = struct.pack("<II", backing, 0) + bytes(info) + bytes(64)
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(100):
                n = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
                dev = os.open(f"/dev/loop{n}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(dev, _LOOP_CONFIGURE, config)
                except OSError as exc:
                    os.close(dev)
                    if exc.errno == errno.EBUSY:  # another process took it first
                        continue
                    raise
                return dev, f"/dev/loop{n}"
        finally:
            os.close(ctl)
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(backing)


def mount_image(image: str | os.PathLike[str], target: str | os.PathLike[str], *,
                backing: str = "auto") -> str:
    """Mount EROFS image file ``image`` read-only on ``target``; returns the backing
    used (``"file"`` or ``"loop"``). Unavailable, in one line, where EROFS cannot
    be mounted here (see the module docs)."""
    if backing not in BACKINGS:
        raise ValueError(f"backing must be one of {', '.join(BACKINGS)}")
    image, target = os.path.abspath(image), os.fspath(target)
    if backing != "loop":
        try:
            _mount(image, target)
            return "file"
        except OSError as exc:
            if backing == "file" or exc.errno not in (errno.ENOTBLK, errno.EINVAL):
                raise _unavailable(image, exc) from exc
    try:
        dev, path = _attach_loop(image)
    except OSError as exc:
        raise _unavailable(image, exc) from exc
    try:
        _mount(path, target)
    except OSError as exc:
        raise _unavailable(image, exc) from exc
    finally:
        os.close(dev)  # the mount holds the device now; it is cleared when unmounted
    return "loop"


def unmount_image(target: str | os.PathLike[str]) -> None:
    """Unmount the image mounted on ``target`` (nothing mounted is fine). Still busy
    (an overlay above it that outlived its snapshot) after a few tries, it is
    detached: the kernel keeps it for its users, and the file can go."""
    path = os.fspath(target).encode()
    for attempt in range(20):
        if not is_mounted(target):
            return
        if _libc.umount2(path, 0) == 0:
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        if err != errno.EBUSY:
            raise Internal(f"umount {os.fspath(target)}: {os.strerror(err)}")
        if attempt >= 4:
            with contextlib.suppress(OSError):
                _libc.umount2(path, _MNT_DETACH)
            continue
        time.sleep(0.05)
