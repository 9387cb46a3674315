"""Owner-only modes for everything lamina keeps in a root.

A root is as private as containerd's (``/var/lib/containerd`` is 0700): the
root and every directory lamina makes in it are 0700; its files are 0600
(databases with their ``-wal`` and ``-shm``, locks, ingests, logs, bundles'
files); committed blobs are 0400. Another local user can neither list digests
nor read an image's files out of a blob or a snapshot.

One exception, by necessity: a snapshot's ``fs`` directory is the image's own
tree with the image's modes (its top is what a container sees as ``/``). It is
reached only through 0700 directories, or through a mount, which overlayfs
serves with the mounter's credentials.

A root an earlier lamina made (root 0711, store directories 0755, databases
0644, blobs 0444) is tightened when it is opened: each store tightens its own
directories and files, and the files inside a directory only when that
directory was found loose, so a tight root costs a few ``stat`` calls.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["BLOB_MODE", "DIR_MODE", "FILE_MODE", "private_dirs", "tighten", "tighten_tree"]

DIR_MODE = 0o700
FILE_MODE = 0o600
BLOB_MODE = 0o400


def private_dirs(path: str | os.PathLike[str]) -> Path:
    """Create directory ``path`` and its missing parents, each 0700.

    (``os.makedirs`` gives its mode only to the last directory.)
    """
    p = Path(path)
    missing: list[Path] = []
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise
    return Path(path)


def tighten(path: str | os.PathLike[str], mode: int = DIR_MODE) -> bool:
    """Clear the mode bits of ``path`` that ``mode`` does not have; whether any were set.

    Missing paths, symbolic links and what another user owns are left alone.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return False
    current = stat.S_IMODE(st.st_mode)
    if not current & ~mode:
        return False
    os.chmod(path, current & mode)
    return True


def tighten_tree(path: str | os.PathLike[str], *, file_mode: int = FILE_MODE) -> None:
    """Tighten every directory under ``path`` to 0700 and every other entry to
    ``file_mode`` (without following symbolic links or recursing in Python)."""
    stack = [os.fspath(path)]
    while stack:
        d = stack.pop()
        tighten(d, DIR_MODE)
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            else:
                tighten(e.path, file_mode)
