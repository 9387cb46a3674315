"""A comparable summary of a directory tree: everything an unpack must reproduce."""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any

_SKIP_XATTRS = ("trusted.overlay.", "security.selinux")


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        if n.startswith(_SKIP_XATTRS):
            continue
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def summarize(root: str | os.PathLike[str], *, dir_mtimes: bool = True) -> dict[str, Any]:
    """path -> (type, mode, uid, gid, size, sha256, link, rdev, mtime_ns, xattrs),
    plus ``"<hardlinks>"``: the set of hard-link groups (as sorted path tuples)."""
    root = os.fspath(root)
    out: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            is_dir = stat.S_ISDIR(st.st_mode)
            out[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if stat.S_ISREG(st.st_mode) else 0,
                _sha(full) if stat.S_ISREG(st.st_mode) else "",
                os.readlink(full) if stat.S_ISLNK(st.st_mode) else "",
                st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                st.st_mtime_ns if (dir_mtimes or not is_dir) else 0,
                _xattrs(full),
            )
            if not is_dir and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
    out["<hardlinks>"] = sorted(tuple(sorted(g)) for g in inodes.values() if len(g) > 1)
    return out


def diff(a: dict[str, Any], b: dict[str, Any], limit: int = 20) -> list[str]:
    """Human-readable differences between two summaries (empty when equal)."""
    problems = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            problems.append(f"{path}: {a.get(path)!r} != {b.get(path)!r}")
            if len(problems) >= limit:
                break
    return problems


