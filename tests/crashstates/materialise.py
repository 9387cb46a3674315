"""Write a modelled tree out as a real directory, and compare a tree with one.

Modes, owners, xattrs and modification times are set as the model has them;
a time the model does not know (the inode changed after its time was last
set, as a directory does when an entry is added) is taken from the real root
at the end of the workload, else left as written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from crashstates.tree import Tree

__all__ = ["differences", "final_mtimes", "write_tree"]

_NODE_TYPES = {"c": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO, "s": stat.S_IFSOCK}


def write_tree(tree: Tree, dest: Path, mtimes: dict[int, int]) -> None:
    """Create ``dest`` (absent) holding ``tree``."""
    os.mkdir(dest, 0o700)
    made: dict[int, str] = {}
    dirs: list[tuple[int, str]] = [(tree.root, str(dest))]
    stack = [(tree.root, str(dest))]
    while stack:
        d, real = stack.pop()
        for name, ino in tree.children[d].items():
            path = os.path.join(real, name)
            if ino in made:
                os.link(made[ino], path, follow_symlinks=False)
                continue
            made[ino] = path
            kind = tree.kind[ino]
            if kind == "d":
                os.mkdir(path, 0o700)
                dirs.append((ino, path))
                stack.append((ino, path))
                continue
            if kind == "f":
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(tree.data[ino])
            elif kind == "l":
                os.symlink(tree.target[ino], path)
            else:
                os.mknod(path, _NODE_TYPES[kind] | 0o600, tree.attrs[ino].rdev)
            _set_attrs(tree, ino, path, mtimes)
    for ino, path in reversed(dirs):  # children first: a 0500 directory is filled already
        _set_attrs(tree, ino, path, mtimes)


def _set_attrs(tree: Tree, ino: int, path: str, mtimes: dict[int, int]) -> None:
    a = tree.attrs[ino]
    link = tree.kind[ino] == "l"
    os.chown(path, a.uid, a.gid, follow_symlinks=False)
    if not link:
        os.chmod(path, a.mode)
    for name, value in a.xattrs.items():
        os.setxattr(path, name, value, follow_symlinks=False)
    mtime = a.mtime_ns if a.mtime_ns is not None else mtimes.get(ino)
    if mtime is not None:
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def final_mtimes(tree: Tree, real: Path) -> dict[int, int]:
    """Each inode's modification time in the real root ``real`` (the tree's twin)."""
    out: dict[int, int] = {}
    for rel, ino in tree.walk():
        with contextlib.suppress(FileNotFoundError):
            out[ino] = os.lstat(os.path.join(real, rel) if rel else real).st_mtime_ns
    return out


def differences(tree: Tree, real: Path, *, skip_suffixes: tuple[str, ...] = ("-shm",),
                tolerated: Sequence[str] = ()) -> list[str]:
    """Where ``tree`` and the directory ``real`` disagree (kind, mode, owner, size,
    content, link target, xattrs): the recorder's own check that nothing escaped it.
    Paths at or below a ``tolerated`` one (relative) are not compared."""
    want: dict[str, str] = {}
    for rel, ino in tree.walk():
        want[rel] = _describe_model(tree, ino)
    have: dict[str, str] = {}
    dev = os.lstat(real).st_dev
    for dirpath, dirnames, filenames in os.walk(real):
        if os.lstat(dirpath).st_dev != dev:
            dirnames[:] = []  # a mount point: the directory only, as scan() takes it
            continue
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if name.endswith(skip_suffixes):
                continue
            have[os.path.relpath(full, real)] = _describe_real(full)
    have[""] = _describe_real(str(real))
    out = []
    for rel in sorted(set(want) | set(have)):
        if any(rel == t or rel.startswith(t + "/") for t in tolerated):
            continue
        if want.get(rel) != have.get(rel):
            out.append(f"{rel or '.'}: model {want.get(rel)} != disk {have.get(rel)}")
    return out


def _describe_model(tree: Tree, ino: int) -> str:
    kind = tree.kind[ino]
    a = tree.attrs[ino]
    xattrs = sorted(a.xattrs.items())
    mode = "" if kind == "l" else oct(a.mode)
    body = ""
    if kind == "f":
        body = f"{len(tree.data[ino])}:{hashlib.sha256(tree.data[ino]).hexdigest()[:16]}"
    elif kind == "l":
        body = os.fsdecode(tree.target[ino])
    return f"{kind} {mode} {a.uid}:{a.gid} {body} {xattrs}"


def _describe_real(path: str) -> str:
    st = os.lstat(path)
    m = st.st_mode
    kind = ("d" if stat.S_ISDIR(m) else "f" if stat.S_ISREG(m) else "l" if stat.S_ISLNK(m)
            else "c" if stat.S_ISCHR(m) else "b" if stat.S_ISBLK(m) else "p" if stat.S_ISFIFO(m)
            else "s")
    xattrs = sorted((n, os.getxattr(path, n, follow_symlinks=False))
                    for n in os.listxattr(path, follow_symlinks=False))
    mode = "" if kind == "l" else oct(stat.S_IMODE(m))
    body = ""
    if kind == "f":
        with open(path, "rb") as f:
            data = f.read()
        body = f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"
    elif kind == "l":
        body = os.readlink(path)
    return f"{kind} {mode} {st.st_uid}:{st.st_gid} {body} {xattrs}"
