"""Turn traced system calls into inode-level operations on a :class:`Tree`.

Only what happens below the root counts. A descriptor's path (strace ``-y``)
is looked up in the tree as it stands when the call returns, which is where
the kernel found it; the offset of a plain ``write`` comes from following each
descriptor through open, write and lseek.

SQLite's ``-shm`` files are left out: they hold the shared-memory WAL index,
which the first connection after a restart rebuilds from the WAL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from crashstates.trace import Call, TraceError, fd_path, unhex
from crashstates.tree import (
    Create,
    Link,
    Op,
    Rename,
    SetAttr,
    Sync,
    SyncAll,
    Tree,
    Truncate,
    Unlink,
    Write,
)

__all__ = ["Recorder"]

_SKIPPED_SUFFIXES = ("-shm",)
_O_FLAGS = re.compile(r"O_[A-Z]+")
_IOV = re.compile(r'iov_base=("[^"]*")')
_DEV = re.compile(r"makedev\((0x[0-9a-f]+|\d+), *(0x[0-9a-f]+|\d+)\)")
_TIMES = re.compile(r"\{tv_sec=(-?\d+), tv_nsec=(\w+)\}")


def _perm(mode: str) -> int:
    """A chmod mode as strace prints it (octal; callers may pass the file type too,
    which the kernel ignores)."""
    return int(mode, 8) & 0o7777


def _offset(arg: str) -> int:
    """An offset passed by pointer, as strace prints it: ``[0]`` or ``[0] => [4096]``
    (the value before the call)."""
    m = re.match(r"\[(\d+)\]", arg)
    if m is None:
        raise TraceError(f"unreadable offset {arg!r}")
    return int(m.group(1))


class Recorder:
    """Feeds calls into ``tree`` (the tree at the start) and keeps the operations."""

    def __init__(self, root: Path, tree: Tree, *, umask: int = 0o022) -> None:
        self.root = os.path.realpath(root)
        self.tree = tree
        self.umask = umask
        self.ops: list[Op] = []
        self.cwd = "/"
        self._pos: dict[str, int] = {}
        self._mounts: dict[str, str | None] = {}  # target -> bind source (None: other)
        self.opaque_bytes = 0  # spliced into files below the root, content unknown

    # -- paths ----------------------------------------------------------------------

    def _parts(self, path: str) -> list[str] | None:
        """``path`` as components below the root, or None when it is elsewhere."""
        path = os.path.normpath(path)
        if path.endswith(" (deleted)"):
            return None
        for target, source in self._mounts.items():
            if path == target or path.startswith(target + "/"):
                if source is None:
                    return None  # through an overlay mount: see the final comparison
                path = source + path[len(target):]
        if path == self.root:
            parts: list[str] = []
        elif path.startswith(self.root + "/"):
            parts = path[len(self.root) + 1:].split("/")
        else:
            return None
        if parts and parts[-1].endswith(_SKIPPED_SUFFIXES):
            return None
        return parts

    def _at(self, dirfd: str, name: str) -> str:
        raw = os.fsdecode(unhex(name))
        if raw.startswith("/"):
            return raw
        _, base = fd_path(dirfd)
        if base is None:
            base = self.cwd
        return os.path.join(base, raw)

    def _plain(self, name: str) -> str:
        raw = os.fsdecode(unhex(name))
        return raw if raw.startswith("/") else os.path.join(self.cwd, raw)

    def _ino(self, parts: list[str]) -> int | None:
        return self.tree.lookup(parts)

    def _fd_ino(self, arg: str) -> tuple[str, int | None]:
        fd, path = fd_path(arg)
        if path is None:
            return fd, None
        parts = self._parts(path)
        if parts is None:
            return fd, None
        return fd, self._ino(parts)  # None: made by the kernel (overlayfs's work/work)

    def _parent(self, parts: list[str]) -> int:
        d = self._ino(parts[:-1])
        if d is None or self.tree.kind[d] != "d":
            raise TraceError(f"no parent directory in the model for {'/'.join(parts)}")
        return d

    # -- feeding --------------------------------------------------------------------

    def _emit(self, op: Op) -> None:
        self.tree.apply(op)
        self.ops.append(op)

    def feed(self, calls: Iterable[Call]) -> None:
        for c in calls:
            for a in c.args[:1]:
                if a.startswith("AT_FDCWD<"):
                    _, cwd = fd_path(a)
                    if cwd is not None:
                        self.cwd = cwd
            handler = getattr(self, "_do_" + c.name, None)
            if handler is None:
                raise TraceError(f"no model for {c.name}")
            handler(c)

    # -- opening and writing ------------------------------------------------------------

    def _open(self, c: Call, flags: str, mode: str | None) -> None:
        fd, path = fd_path(c.ret)
        if path is None:
            return
        self._pos[fd] = 0
        names = set(_O_FLAGS.findall(flags))
        if "O_TMPFILE" in names:
            raise TraceError("O_TMPFILE is not modelled")
        parts = self._parts(path)
        if parts is None:
            return
        ino = self._ino(parts)
        if ino is None:
            if "O_CREAT" not in names:
                return  # made by the kernel: overlayfs's work/work (the final comparison
                # would show anything that lasted)
            perm = int(mode or "0", 8) & ~self.umask & 0o7777
            self._emit(Create(self._parent(parts), parts[-1], self.tree.new_ino(), "f", perm))
            return
        if "O_TRUNC" in names and self.tree.kind[ino] == "f" and self.tree.data[ino]:
            self._emit(Truncate(ino, 0))
        if "O_APPEND" in names and self.tree.kind[ino] == "f":
            self._pos[fd] = len(self.tree.data[ino])

    def _do_open(self, c: Call) -> None:
        self._open(c, c.args[1], c.args[2] if len(c.args) > 2 else None)

    def _do_creat(self, c: Call) -> None:
        self._open(c, "O_CREAT|O_WRONLY|O_TRUNC", c.args[1])

    def _do_openat(self, c: Call) -> None:
        self._open(c, c.args[2], c.args[3] if len(c.args) > 3 else None)

    def _do_openat2(self, c: Call) -> None:
        how = c.args[2]
        flags = re.search(r"flags=([A-Z_|0-9x]+)", how)
        mode = re.search(r"mode=(0[0-7]*)", how)
        self._open(c, flags.group(1) if flags else "", mode.group(1) if mode else None)

    def _write(self, fd_arg: str, data: bytes, offset: int | None) -> None:
        fd, ino = self._fd_ino(fd_arg)
        at = self._pos.get(fd, 0) if offset is None else offset
        if offset is None:
            self._pos[fd] = at + len(data)
        if ino is None or not data:
            return
        if self.tree.kind[ino] != "f":
            raise TraceError(f"a write to a {self.tree.kind[ino]!r} inode")
        self._emit(Write(ino, at, data))

    def _do_write(self, c: Call) -> None:
        self._write(c.args[0], unhex(c.args[1])[: int(c.ret)], None)

    def _do_pwrite64(self, c: Call) -> None:
        self._write(c.args[0], unhex(c.args[1])[: int(c.ret)], int(c.args[3]))

    def _iov(self, arg: str, n: int) -> bytes:
        return b"".join(unhex(s) for s in _IOV.findall(arg))[:n]

    def _do_writev(self, c: Call) -> None:
        self._write(c.args[0], self._iov(c.args[1], int(c.ret)), None)

    def _do_pwritev(self, c: Call) -> None:
        self._write(c.args[0], self._iov(c.args[1], int(c.ret)), int(c.args[3]))

    _do_pwritev2 = _do_pwritev

    def _do_lseek(self, c: Call) -> None:
        fd, _ = fd_path(c.args[0])
        self._pos[fd] = int(c.ret)

    def _copy(self, in_arg: str, in_off: str, out_arg: str, out_off: str, n: int) -> None:
        in_fd, src = self._fd_ino(in_arg)
        _, dst = self._fd_ino(out_arg)
        if dst is None:
            return
        if src is None:
            raise TraceError("a copy into the root from a file the model does not have")
        start = _offset(in_off) if in_off != "NULL" else self._pos.get(in_fd, 0)
        if in_off == "NULL":
            self._pos[in_fd] = start + n
        data = bytes(self.tree.data[src][start:start + n])
        self._write(out_arg, data, None if out_off == "NULL" else _offset(out_off))

    def _do_sendfile(self, c: Call) -> None:
        self._copy(c.args[1], c.args[2], c.args[0], "NULL", int(c.ret))

    def _do_copy_file_range(self, c: Call) -> None:
        self._copy(c.args[0], c.args[1], c.args[2], c.args[3], int(c.ret))

    def _do_splice(self, c: Call) -> None:
        """From a pipe into a file (CRIU's page images): the bytes never show in the
        trace, so the model writes zeros (:attr:`opaque_bytes` counts them). The
        final comparison fails if such a file outlives the workload."""
        _, dst = self._fd_ino(c.args[2])
        if dst is None:
            return
        n = int(c.ret)
        self.opaque_bytes += n
        self._write(c.args[2], bytes(n), None if c.args[3] == "NULL" else _offset(c.args[3]))

    # -- durability -----------------------------------------------------------------------

    def _do_fsync(self, c: Call) -> None:
        _, ino = self._fd_ino(c.args[0])
        if ino is not None:
            self.ops.append(Sync(ino))

    _do_fdatasync = _do_fsync

    def _do_syncfs(self, c: Call) -> None:
        _, path = fd_path(c.args[0])
        if path is not None and self._parts(path) is not None:
            self.ops.append(SyncAll())

    def _do_sync(self, c: Call) -> None:
        self.ops.append(SyncAll())

    def _do_sync_file_range(self, c: Call) -> None:
        """Starts or waits for writeback of a range, but promises nothing durable."""

    # -- names ------------------------------------------------------------------------------

    def _rename(self, src: str, dst: str, flags: str = "0") -> None:
        if "RENAME_EXCHANGE" in flags:
            raise TraceError("RENAME_EXCHANGE is not modelled")
        sp, dp = self._parts(src), self._parts(dst)
        if sp is None and dp is None:
            return
        if sp is None or dp is None:
            raise TraceError(f"a rename across the root's edge: {src} -> {dst}")
        if self._ino(sp) is None:
            raise TraceError(f"renamed {src}, which the model does not have")
        self._emit(Rename(self._parent(sp), sp[-1], self._parent(dp), dp[-1]))

    def _do_rename(self, c: Call) -> None:
        self._rename(self._plain(c.args[0]), self._plain(c.args[1]))

    def _do_renameat(self, c: Call) -> None:
        self._rename(self._at(c.args[0], c.args[1]), self._at(c.args[2], c.args[3]))

    def _do_renameat2(self, c: Call) -> None:
        self._rename(self._at(c.args[0], c.args[1]), self._at(c.args[2], c.args[3]), c.args[4])

    def _link(self, src: str, dst: str) -> None:
        sp, dp = self._parts(src), self._parts(dst)
        if dp is None:
            return
        ino = self._ino(sp) if sp is not None else None
        if ino is None:
            raise TraceError(f"a hard link into the root from outside the model: {src}")
        self._emit(Link(self._parent(dp), dp[-1], ino))

    def _do_link(self, c: Call) -> None:
        self._link(self._plain(c.args[0]), self._plain(c.args[1]))

    def _do_linkat(self, c: Call) -> None:
        if "AT_EMPTY_PATH" in c.args[4]:
            raise TraceError("linkat(AT_EMPTY_PATH) is not modelled")
        self._link(self._at(c.args[0], c.args[1]), self._at(c.args[2], c.args[3]))

    def _unlink(self, path: str) -> None:
        parts = self._parts(path)
        if parts is None or self._ino(parts) is None:
            return
        self._emit(Unlink(self._parent(parts), parts[-1]))

    def _do_unlink(self, c: Call) -> None:
        self._unlink(self._plain(c.args[0]))

    _do_rmdir = _do_unlink

    def _do_unlinkat(self, c: Call) -> None:
        self._unlink(self._at(c.args[0], c.args[1]))

    def _create(self, path: str, kind: str, mode: int, *, target: bytes = b"",
                rdev: int = 0) -> None:
        parts = self._parts(path)
        if parts is None:
            return
        perm = mode if kind == "l" else mode & ~self.umask & 0o7777
        self._emit(Create(self._parent(parts), parts[-1], self.tree.new_ino(), kind, perm,
                          target=target, rdev=rdev))

    def _do_mkdir(self, c: Call) -> None:
        self._create(self._plain(c.args[0]), "d", int(c.args[1], 8))

    def _do_mkdirat(self, c: Call) -> None:
        self._create(self._at(c.args[0], c.args[1]), "d", int(c.args[2], 8))

    def _do_symlink(self, c: Call) -> None:
        self._create(self._plain(c.args[1]), "l", 0o777, target=unhex(c.args[0]))

    def _do_symlinkat(self, c: Call) -> None:
        self._create(self._at(c.args[1], c.args[2]), "l", 0o777, target=unhex(c.args[0]))

    def _mknod(self, path: str, mode: str, dev: str | None) -> None:
        kinds = {"S_IFCHR": "c", "S_IFBLK": "b", "S_IFIFO": "p", "S_IFSOCK": "s",
                 "S_IFREG": "f"}
        kind, perm = "f", 0
        for part in mode.split("|"):
            part = part.strip()
            if part in kinds:
                kind = kinds[part]
            elif part.isdigit():
                perm = int(part, 8)
        rdev = 0
        m = _DEV.search(dev or "")
        if m is not None:
            rdev = os.makedev(int(m.group(1), 0), int(m.group(2), 0))
        self._create(path, kind, perm, rdev=rdev)

    def _do_mknod(self, c: Call) -> None:
        self._mknod(self._plain(c.args[0]), c.args[1], c.args[2] if len(c.args) > 2 else None)

    def _do_mknodat(self, c: Call) -> None:
        self._mknod(self._at(c.args[0], c.args[1]), c.args[2],
                    c.args[3] if len(c.args) > 3 else None)

    # -- sizes and attributes ----------------------------------------------------------------

    def _path_ino(self, path: str) -> int | None:
        parts = self._parts(path)
        return None if parts is None else self._ino(parts)

    def _do_truncate(self, c: Call) -> None:
        ino = self._path_ino(self._plain(c.args[0]))
        if ino is not None:
            self._emit(Truncate(ino, int(c.args[1])))

    def _do_ftruncate(self, c: Call) -> None:
        _, ino = self._fd_ino(c.args[0])
        if ino is not None:
            self._emit(Truncate(ino, int(c.args[1])))

    def _do_fallocate(self, c: Call) -> None:
        _, ino = self._fd_ino(c.args[0])
        if ino is None:
            return
        mode = c.args[1]
        if mode not in ("0", "FALLOC_FL_KEEP_SIZE"):
            raise TraceError(f"fallocate mode {mode} is not modelled")
        end = int(c.args[2]) + int(c.args[3])
        if mode == "0" and end > len(self.tree.data[ino]):
            self._emit(Truncate(ino, end))

    def _attr(self, ino: int | None, **kw: object) -> None:
        if ino is not None:
            self._emit(SetAttr(ino, **kw))  # type: ignore[arg-type]

    def _do_chmod(self, c: Call) -> None:
        self._attr(self._path_ino(self._plain(c.args[0])), mode=_perm(c.args[1]))

    def _do_fchmod(self, c: Call) -> None:
        self._attr(self._fd_ino(c.args[0])[1], mode=_perm(c.args[1]))

    def _do_fchmodat(self, c: Call) -> None:
        self._attr(self._path_ino(self._at(c.args[0], c.args[1])), mode=_perm(c.args[2]))

    @staticmethod
    def _ids(uid: str, gid: str) -> dict[str, object]:
        out: dict[str, object] = {}
        if uid != "-1":
            out["uid"] = int(uid)
        if gid != "-1":
            out["gid"] = int(gid)
        return out

    def _do_chown(self, c: Call) -> None:
        self._attr(self._path_ino(self._plain(c.args[0])), **self._ids(c.args[1], c.args[2]))

    _do_lchown = _do_chown

    def _do_fchown(self, c: Call) -> None:
        self._attr(self._fd_ino(c.args[0])[1], **self._ids(c.args[1], c.args[2]))

    def _do_fchownat(self, c: Call) -> None:
        path = self._at(c.args[0], c.args[1]) if c.args[1] != '""' else fd_path(c.args[0])[1]
        if path is not None:
            self._attr(self._path_ino(path), **self._ids(c.args[2], c.args[3]))

    def _xattr(self, ino: int | None, name: str, value: bytes | None) -> None:
        self._attr(ino, xattr=(os.fsdecode(unhex(name)), value))

    def _do_setxattr(self, c: Call) -> None:
        self._xattr(self._path_ino(self._plain(c.args[0])), c.args[1],
                    unhex(c.args[2])[: int(c.args[3])])

    _do_lsetxattr = _do_setxattr

    def _do_fsetxattr(self, c: Call) -> None:
        self._xattr(self._fd_ino(c.args[0])[1], c.args[1], unhex(c.args[2])[: int(c.args[3])])

    def _do_removexattr(self, c: Call) -> None:
        self._xattr(self._path_ino(self._plain(c.args[0])), c.args[1], None)

    _do_lremovexattr = _do_removexattr

    def _do_fremovexattr(self, c: Call) -> None:
        self._xattr(self._fd_ino(c.args[0])[1], c.args[1], None)

    def _do_utimensat(self, c: Call) -> None:
        if c.args[1] == "NULL":
            ino = self._fd_ino(c.args[0])[1]
        else:
            ino = self._path_ino(self._at(c.args[0], c.args[1]))
        if ino is None:
            return
        times = _TIMES.findall(c.args[2])
        if c.args[2] == "NULL" or (len(times) == 2 and times[1][1] == "UTIME_NOW"):
            self._attr(ino, touch=True)
        elif len(times) == 2 and times[1][1] != "UTIME_OMIT":
            self._attr(ino, mtime_ns=int(times[1][0]) * 1_000_000_000 + int(times[1][1]))

    # -- mounts ------------------------------------------------------------------------------

    def _do_mount(self, c: Call) -> None:
        target = self._plain(c.args[1])
        below = target == self.root or target.startswith(self.root + "/")
        if below and "MS_REMOUNT" not in c.args[3]:
            bind = "MS_BIND" in c.args[3]
            source = os.path.normpath(self._plain(c.args[0])) if bind else None
            self._mounts[os.path.normpath(target)] = source

    def _do_umount2(self, c: Call) -> None:
        self._mounts.pop(os.path.normpath(self._plain(c.args[0])), None)

