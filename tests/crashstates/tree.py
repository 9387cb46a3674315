"""A model of a directory tree, changed by inode-level operations.

The same :class:`Tree` serves twice: the recorder replays every traced call on
it to turn paths into inodes, and each crash state replays the chosen subset of
those operations on a copy of the starting tree before it is written out.
Operations name inodes and (directory inode, name) pairs, never paths, so a
subset replays the same way whatever was left out.
"""

from __future__ import annotations

import copy
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Create", "Link", "Op", "Rename", "SetAttr", "Sync", "SyncAll", "Tree", "Truncate",
    "Unlink", "Write", "is_data", "is_meta",
]


@dataclass
class Attrs:
    mode: int
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime_ns: int | None = None  # None: changed since it was last set explicitly


# ----------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Create:
    """A new inode ``ino`` of ``kind`` ('f', 'd', 'l', or a node type) at (dir, name)."""

    dir: int
    name: str
    ino: int
    kind: str
    mode: int
    target: bytes = b""
    rdev: int = 0


@dataclass(frozen=True)
class Link:
    dir: int
    name: str
    ino: int


@dataclass(frozen=True)
class Unlink:
    """unlink or rmdir."""

    dir: int
    name: str


@dataclass(frozen=True)
class Rename:
    sdir: int
    sname: str
    ddir: int
    dname: str


@dataclass(frozen=True)
class SetAttr:
    ino: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    xattr: tuple[str, bytes | None] | None = None
    mtime_ns: int | None = None
    touch: bool = False  # utimensat(UTIME_NOW)


@dataclass(frozen=True)
class Truncate:
    ino: int
    size: int


@dataclass(frozen=True)
class Write:
    ino: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class Sync:
    """fsync / fdatasync of one inode (a file's data, or a directory's entries)."""

    ino: int


@dataclass(frozen=True)
class SyncAll:
    """sync / syncfs: everything written so far is durable."""


Op = Create | Link | Unlink | Rename | SetAttr | Truncate | Write | Sync | SyncAll


def is_meta(op: Op) -> bool:
    """Journalled metadata: persists in program order (see :mod:`crashstates.model`)."""
    return isinstance(op, Create | Link | Unlink | Rename | SetAttr | Truncate)


def is_data(op: Op) -> bool:
    return isinstance(op, Write)


ACL_ACCESS = "system.posix_acl_access"


def acl_mode(value: bytes) -> int:
    """The permission bits a minimal access ACL stands for (the kernel stores such an
    ACL as the mode alone; an extended one is not modelled)."""
    perms = {}
    for i in range(4, len(value), 8):
        tag = int.from_bytes(value[i:i + 2], "little")
        perms[tag] = int.from_bytes(value[i + 2:i + 4], "little")
    if set(perms) - {0x01, 0x04, 0x20}:
        raise ValueError("an extended POSIX ACL is not modelled")
    return (perms.get(0x01, 0) << 6) | (perms.get(0x04, 0) << 3) | perms.get(0x20, 0)


# ----------------------------------------------------------------------------- the tree


class Tree:
    """Inodes and directory entries below one root directory."""

    def __init__(self) -> None:
        self.root = 0
        self.kind: dict[int, str] = {0: "d"}
        self.children: dict[int, dict[str, int]] = {0: {}}
        self.data: dict[int, bytearray] = {}
        self.target: dict[int, bytes] = {}
        self.attrs: dict[int, Attrs] = {0: Attrs(mode=0o700)}
        self.next_ino = 1

    def copy(self) -> Tree:
        return copy.deepcopy(self)

    def new_ino(self) -> int:
        self.next_ino += 1
        return self.next_ino - 1

    # -- lookups ------------------------------------------------------------------

    def lookup(self, parts: list[str]) -> int | None:
        ino = self.root
        for part in parts:
            if self.kind.get(ino) == "l":
                raise LookupError(f"path through a symlink: {'/'.join(parts)}")
            if self.kind.get(ino) != "d":
                return None
            nxt = self.children[ino].get(part)
            if nxt is None:
                return None
            ino = nxt
        return ino

    def walk(self) -> list[tuple[str, int]]:
        """Every (path, inode) reachable from the root (a hard link once per name);
        paths are relative, '/'-separated, the root itself is ''."""
        out = [("", self.root)]
        stack = [("", self.root)]
        while stack:
            rel, d = stack.pop()
            for name, ino in self.children[d].items():
                path = f"{rel}/{name}" if rel else name
                out.append((path, ino))
                if self.kind[ino] == "d":
                    stack.append((path, ino))
        return out

    # -- changes ------------------------------------------------------------------

    def apply(self, op: Op) -> None:
        if isinstance(op, Create):
            self.kind[op.ino] = op.kind
            self.attrs[op.ino] = Attrs(mode=op.mode, rdev=op.rdev)
            if op.kind == "d":
                self.children[op.ino] = {}
            elif op.kind == "f":
                self.data[op.ino] = bytearray()
            elif op.kind == "l":
                self.target[op.ino] = op.target
            self._enter(op.dir, op.name, op.ino)
        elif isinstance(op, Link):
            self._enter(op.dir, op.name, op.ino)
        elif isinstance(op, Unlink):
            self.children[op.dir].pop(op.name, None)
            self._touch(op.dir)
        elif isinstance(op, Rename):
            ino = self.children[op.sdir].pop(op.sname)
            self._enter(op.ddir, op.dname, ino)
            self._touch(op.sdir)
        elif isinstance(op, SetAttr):
            a = self.attrs[op.ino]
            if op.mode is not None:
                a.mode = op.mode
            if op.uid is not None:
                a.uid = op.uid
            if op.gid is not None:
                a.gid = op.gid
            if op.xattr is not None:
                name, value = op.xattr
                if name == ACL_ACCESS and value is not None:
                    a.mode = (a.mode & ~0o777) | acl_mode(value)  # the kernel keeps it as mode
                elif value is None:
                    a.xattrs.pop(name, None)
                else:
                    a.xattrs[name] = value
            if op.mtime_ns is not None:
                a.mtime_ns = op.mtime_ns
            elif op.touch:
                a.mtime_ns = None
        elif isinstance(op, Truncate):
            buf = self.data[op.ino]
            if op.size < len(buf):
                del buf[op.size:]
            else:
                buf.extend(bytes(op.size - len(buf)))
            self._touch(op.ino)
        elif isinstance(op, Write):
            if op.ino not in self.data:
                return  # its creation did not persist: the data went with the inode
            buf = self.data[op.ino]
            end = op.offset + len(op.data)
            if len(buf) < op.offset:
                buf.extend(bytes(op.offset - len(buf)))
            buf[op.offset:end] = op.data
            self._touch(op.ino)

    def _enter(self, d: int, name: str, ino: int) -> None:
        self.children[d][name] = ino
        self._touch(d)

    def _touch(self, ino: int) -> None:
        self.attrs[ino].mtime_ns = None


def scan(path: Path) -> tuple[Tree, dict[int, int]]:
    """The tree at ``path`` as a :class:`Tree` (contents read), and st_ino -> model inode."""
    t = Tree()
    st = os.lstat(path)
    t.attrs[0] = _attrs_of(str(path), st)
    by_st: dict[int, int] = {st.st_ino: 0}
    stack = [(str(path), 0)]
    while stack:
        real, d = stack.pop()
        if os.lstat(real).st_dev != st.st_dev:
            continue  # a mount point (a running container's rootfs): only the directory
        with os.scandir(real) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            est = os.lstat(e.path)
            same = by_st.get(est.st_ino) if est.st_dev == st.st_dev else None
            if same is not None and not stat.S_ISDIR(est.st_mode):  # a hard link
                t.children[d][e.name] = same
                continue
            ino = t.new_ino()
            if est.st_dev == st.st_dev:
                by_st[est.st_ino] = ino
            t.children[d][e.name] = ino
            t.attrs[ino] = _attrs_of(e.path, est)
            if stat.S_ISDIR(est.st_mode):
                t.kind[ino] = "d"
                t.children[ino] = {}
                stack.append((e.path, ino))
            elif stat.S_ISREG(est.st_mode):
                t.kind[ino] = "f"
                with open(e.path, "rb") as f:
                    t.data[ino] = bytearray(f.read())
            elif stat.S_ISLNK(est.st_mode):
                t.kind[ino] = "l"
                t.target[ino] = os.fsencode(os.readlink(e.path))
            else:
                t.kind[ino] = _node_kind(est.st_mode)
    return t, by_st


def _node_kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "c"
    if stat.S_ISBLK(mode):
        return "b"
    if stat.S_ISFIFO(mode):
        return "p"
    return "s"


def _attrs_of(path: str, st: os.stat_result) -> Attrs:
    xattrs: dict[str, bytes] = {}
    for name in os.listxattr(path, follow_symlinks=False):
        xattrs[name] = os.getxattr(path, name, follow_symlinks=False)
    return Attrs(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                 rdev=st.st_rdev, xattrs=xattrs, mtime_ns=st.st_mtime_ns)
