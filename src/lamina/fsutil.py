"""Small filesystem helpers that must be right once and used everywhere."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_write", "fsync_dir", "locked", "remove_tree"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never half.

    A temporary file in the same directory is written and fsynced, renamed over
    ``path``, and the directory is fsynced.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a directory tree, including read-only and immutable-looking parts."""

    def _onexc(func: object, p: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError):
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(p), 0o700)
                os.chmod(p, 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, onerror=lambda *a: None)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            return
        raise exc

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=lambda f, p, ei: _onexc(f, p, ei[1]))


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing) for the block.

    flock locks belong to the open file, so two threads of one process exclude
    each other just like two processes do.
    """
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
