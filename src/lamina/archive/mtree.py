"""Tree manifests: what a layer directory held when it was committed.

A manifest lists every entry below a directory — path, type, mode, owner,
size, content hash of regular files, link target, device number,
modification time and extended attributes — in one deterministic order
(depth first, names sorted bytewise). It is umoci's ``mtree`` idea: record
the tree when a layer is unpacked, walk it again later and report every
difference, so a lower layer that was tampered with or rotted on disk is
found although nothing else reads it until a container does.

:func:`record` walks a directory and yields :class:`Entry` values;
:func:`encode` / :func:`decode` turn them into a compact JSON-lines byte
stream (gzip-compressed) and back; :func:`compare` merges two sorted
sequences and yields a :class:`Difference` for each path missing, extra or
changed. The walk (:class:`lamina.fs.walk.Walk`) holds a bounded number
of directory descriptors whatever the depth, and never builds a path for
the kernel, so trees deeper than ``PATH_MAX`` are fine, and it
follows no symlink. Memory is bounded by the depth of the tree, not its size.

Directory times are left out: overlayfs may touch a lower directory's
``atime`` only, but tools that bind-mount a layer for reading may not be as
careful, and a directory's content is covered by its entries. Symlinks'
extended attributes are not recorded (they cannot be read through a
descriptor).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from lamina.errors import InvalidArgument
from lamina.fs.tree import DIR_FLAGS
from lamina.fs.walk import BYTES, Walk

__all__ = ["MEDIA_TYPE", "Difference", "Entry", "compare", "decode", "encode", "record"]

MEDIA_TYPE = "application/vnd.lamina.mtree.v1+jsonl+gzip"

_CHUNK = 1 << 20
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class Entry:
    """One path below the walked directory (``path`` is relative, ``/``-separated)."""

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int = 0
    sha256: str = ""
    target: str = ""
    rdev: int = 0
    mtime_ns: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """Everything but the path, for comparing two entries."""
        out = asdict(self)
        del out["path"]
        return out


@dataclass(frozen=True)
class Difference:
    """``path`` is ``missing`` (recorded, gone), ``extra`` (new) or ``changed``."""

    path: str
    what: str
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.what == "changed":
            return f"{self.path}: {', '.join(self.fields)} changed"
        return f"{self.path}: {self.what}"


def _xattrs(fd: int) -> dict[str, str]:
    try:
        names = os.listxattr(fd)
    except OSError:
        return {}
    out: dict[str, str] = {}
    for name in sorted(names):
        try:
            out[name] = os.getxattr(fd, name).hex()
        except OSError:
            continue
    return out


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def _common(path: str, st: os.stat_result) -> dict[str, Any]:
    return {"path": path, "kind": _KINDS.get(stat.S_IFMT(st.st_mode), "unknown"),
            "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}


def _leaf(path: str, name: str, parent_fd: int, st: os.stat_result) -> Entry:
    """The entry for non-directory ``name`` in ``parent_fd``."""
    common = _common(path, st)
    kind = common["kind"]
    if kind == "symlink":
        return Entry(**common, target=os.readlink(name, dir_fd=parent_fd),
                     mtime_ns=st.st_mtime_ns)
    if kind in ("char", "block"):
        return Entry(**common, rdev=st.st_rdev, mtime_ns=st.st_mtime_ns)
    if kind != "file":
        return Entry(**common, mtime_ns=st.st_mtime_ns)
    fd = os.open(name, _FILE_FLAGS, dir_fd=parent_fd)
    try:
        return Entry(**common, size=st.st_size, sha256=_hash_fd(fd), mtime_ns=st.st_mtime_ns,
                     xattrs=_xattrs(fd))
    finally:
        os.close(fd)


def record(directory: str | os.PathLike[str]) -> Iterator[Entry]:
    """Every entry below ``directory`` (not itself), depth first, names sorted bytewise.

    The walk (:class:`lamina.fs.walk.Walk`) holds a bounded number of
    descriptors whatever the depth."""
    root_fd = os.open(directory, DIR_FLAGS)
    try:
        walk = Walk(root_fd, key=BYTES)
        for e in walk:
            if not stat.S_ISDIR(e.stat.st_mode):
                yield _leaf(e.path, e.name, e.parent, e.stat)
                continue
            fd = walk.enter()
            yield Entry(**_common(e.path, e.stat), xattrs=_xattrs(fd))
    finally:
        os.close(root_fd)


def _sort_key(path: str) -> list[bytes]:
    return [os.fsencode(part) for part in path.split("/")]


def encode(entries: Iterable[Entry], out: IO[bytes]) -> int:
    """Write ``entries`` to ``out`` as gzip-compressed JSON lines; returns the count."""
    count = 0
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6) as gz:
        for e in entries:
            gz.write(json.dumps(asdict(e), separators=(",", ":"), sort_keys=True).encode())
            gz.write(b"\n")
            count += 1
    return count


#: the longest line :func:`decode` reads: an entry's path has no length limit in a
#: tree made through directory descriptors (2,048 levels of 255-byte names are
#: 0.5 MB), so this only bounds what a blob that is no manifest costs in memory
_MAX_LINE = 16 << 20


def decode(stream: IO[bytes]) -> Iterator[Entry]:
    """The entries :func:`encode` wrote; InvalidArgument on anything else."""
    try:
        with gzip.GzipFile(fileobj=stream, mode="rb") as gz:
            while line := gz.readline(_MAX_LINE + 1):  # a line is read whole: bounded
                if len(line) > _MAX_LINE:
                    raise ValueError(f"a line longer than {_MAX_LINE} bytes")
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
                yield Entry(**obj)
    except (OSError, EOFError, ValueError, TypeError) as exc:
        raise InvalidArgument(f"invalid tree manifest: {exc}") from exc


def compare(expected: Iterable[Entry], actual: Iterable[Entry]) -> Iterator[Difference]:
    """Merge two sequences in :func:`record` order and yield what differs."""
    exp, act = iter(expected), iter(actual)
    e, a = next(exp, None), next(act, None)
    while e is not None or a is not None:
        if a is None or (e is not None and _sort_key(e.path) < _sort_key(a.path)):
            assert e is not None
            yield Difference(e.path, "missing")
            e = next(exp, None)
        elif e is None or _sort_key(a.path) < _sort_key(e.path):
            yield Difference(a.path, "extra")
            a = next(act, None)
        else:
            ef, af = e.fields(), a.fields()
            changed = tuple(k for k in ef if ef[k] != af[k])
            if changed:
                yield Difference(e.path, "changed", changed)
            e, a = next(exp, None), next(act, None)
