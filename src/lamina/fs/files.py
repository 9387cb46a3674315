"""Small filesystem helpers that must be right once and used everywhere."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import stat
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from lamina.errors import InvalidArgument, Unavailable

# ctypes, tempfile and fs.remove are imported by the helpers that use them: every
# command imports this module (the database's fsync_dir), few sync, write or remove.
if TYPE_CHECKING:
    import ctypes

__all__ = ["WRITEBACK_EVERY", "atomic_file", "atomic_write", "filesystem_type", "fsync_dir",
           "libc", "locked", "names_open_file", "read_regular_file", "remove_tree",
           "start_writeback", "sync_filesystem"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, loaded once for the process (ctypes, with errno kept)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def sync_filesystem(path: str | os.PathLike[str]) -> None:
    """Write back every dirty page and inode of the filesystem holding ``path``
    (syncfs(2)): one call makes a whole freshly written tree durable, cheaper
    than an fsync per file. It waits for the writeback, as fsync does."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc().syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {os.fspath(path)}: {os.strerror(err)}")
    finally:
        os.close(fd)


#: sync_file_range(2)'s flag: start writing the range back, do not wait for it
_SYNC_FILE_RANGE_WRITE = 2
#: how many bytes a writer of a large file that it fsyncs at the end (a blob, an
#: EROFS layer) writes before it starts their writeback: the fsync then waits
#: for at most about this much, not for the whole file
WRITEBACK_EVERY = 4 << 20


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    import ctypes

    try:
        f = libc().sync_file_range
    except AttributeError:  # not Linux's libc
        return None
    f.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    f.restype = ctypes.c_int
    return f


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing ``length`` bytes of ``fd`` at ``offset`` to
    disk now, without waiting: the fsync that makes a large file durable then
    finds most of it written, instead of writing all of it while its caller
    waits. A hint: where the filesystem or libc has no such call it does nothing."""
    f = _sync_file_range()
    if f is not None:
        f(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, mode: int = 0o600) -> Iterator[int]:
    """Write ``path`` so that readers see the old file or the new, never half.

    Yields the fd of a temporary file in the same directory (0600 while being
    written); when the block ends without an error the file is fsynced, given
    ``mode``, renamed over ``path``, and the directory is fsynced. On an error
    the temporary file is removed and ``path`` is left as it was.
    """
    import tempfile

    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never half.

    A temporary file in the same directory is written and fsynced, renamed over
    ``path``, and the directory is fsynced (see :func:`atomic_file`). The file is
    owner-only unless ``mode`` says otherwise.
    """
    with atomic_file(path, mode=mode) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


def read_regular_file(path: str | os.PathLike[str], *, limit: int, what: str) -> bytes | None:
    """The bytes of the regular file at ``path``, None when nothing is there.

    For files someone else made (an image's, a checkpoint's): nothing but a
    regular file is opened — a FIFO would block, a device could act on open —
    the last component is not followed, and a file of more than ``limit`` bytes
    is not read. Each of those is InvalidArgument naming ``what``.
    """
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{what} is not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(f"{what} cannot be read: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the lstat
            raise InvalidArgument(f"{what} is not a regular file")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise InvalidArgument(f"{what} is larger than {limit:,} bytes")
    return b"".join(chunks)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` and everything below it, at any depth; a missing path is fine.

    Read-only directories are made writable on the way; a symlink is removed,
    never followed (see :func:`lamina.fs.remove.remove_tree_at`).
    """
    from lamina.fs.remove import remove_tree_at

    path = os.fspath(path).rstrip("/") or "/"
    parent, name = os.path.split(path)
    try:
        parent_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        remove_tree_at(parent_fd, name)
    finally:
        os.close(parent_fd)


#: how often a transient lock is taken again because its file was removed while
#: this process waited (each time, another holder had it and let it go)
RELOCK_TRIES = 1000


def names_open_file(fd: int, path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (it was not removed or
    replaced since it was opened)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino)


def filesystem_type(path: str | os.PathLike[str]) -> int:
    """The ``f_type`` magic of the filesystem holding ``path`` (statfs(2))."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes; f_type first
    if libc().statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


@contextlib.contextmanager
def locked(path: str | os.PathLike[str], *, transient: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing) for the block.

    flock locks belong to the open file, so two threads of one process exclude
    each other just like two processes do.

    ``transient``: the holder removes the file as it lets the lock go, so locks
    named after things without number (a chain ID, a container) leave no file
    behind. A process that waited on a file removed meanwhile takes the lock
    again on the file the name now has.
    """
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    for _ in range(RELOCK_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if transient and not names_open_file(fd, path):
                continue  # its holder removed it: the lock lives on under a new file
            try:
                yield
            finally:
                if transient:  # while it is still held: a waiter sees it gone
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            return
        finally:
            os.close(fd)
    raise Unavailable(f"lock {os.fspath(path)}: removed {RELOCK_TRIES} times while "
                      "this process waited for it")
