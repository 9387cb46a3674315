"""Containers' logs: what their detached tasks wrote, kept until the container goes.

A container's detached task writes its stdout and stderr (interleaved, as
they come) to ``<root>/logs/<id>/output.log``; the task's shim rotates it to
``output.log.1`` once it passes :data:`~lamina.containers.runtime.bundle.OUTPUT_MAX`
(5 MiB), so at most 10 MiB of a container's newest output is kept. The log
outlives the task (a stopped, deleted or restarted task appends to it) and is
removed with the container. Foreground tasks write to the caller's terminal,
not here.

:meth:`ContainerLogs.follow` reads the log as it grows, across rotations,
until the caller says the task is done: it polls (every ``poll`` seconds),
so it needs nothing from the shim.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from lamina.fs.files import remove_tree
from lamina.fs.perms import DIR_MODE

__all__ = ["ContainerLogs", "logs_dir"]

_CHUNK = 65536


def logs_dir(root_path: str | os.PathLike[str]) -> Path:
    """Where a root keeps its containers' logs."""
    return Path(root_path) / "logs"


class ContainerLogs:
    """The logs of the containers of one root."""

    def __init__(self, root_path: str | os.PathLike[str]) -> None:
        self.base = logs_dir(root_path)

    def path(self, cid: str) -> Path:
        """The log ``cid``'s detached task writes to (whether or not it exists)."""
        return self.base / cid / "output.log"

    def prepare(self, cid: str) -> Path:
        """The log of ``cid``, its directory made: what a detached start writes to."""
        self.base.mkdir(mode=DIR_MODE, exist_ok=True)
        (self.base / cid).mkdir(mode=DIR_MODE, exist_ok=True)
        return self.path(cid)

    def remove(self, cid: str) -> None:
        """Forget ``cid``'s log (no error when it has none)."""
        remove_tree(self.base / cid)

    def _files(self, cid: str) -> list[Path]:
        current = self.path(cid)
        return [current.with_name(current.name + ".1"), current]

    def read(self, cid: str, *, tail: int | None = None) -> Iterator[bytes]:
        """The log as it is now, oldest first; with ``tail``, its last ``tail`` lines."""
        data, _ = self._snapshot(cid, tail=tail)
        yield from data

    def _snapshot(self, cid: str, *, tail: int | None) -> tuple[list[bytes], tuple[int, int]]:
        """The log's chunks now, and where the current file was read up to
        (its inode and offset), for :meth:`follow` to go on from."""
        chunks: list[bytes] = []
        position = (0, 0)
        for path in self._files(cid):
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                continue
            with f:
                while chunk := f.read(_CHUNK):
                    chunks.append(chunk)
                if path == self.path(cid):
                    position = (os.fstat(f.fileno()).st_ino, f.tell())
        if tail is not None:
            chunks = [_last_lines(b"".join(chunks), tail)]
        return chunks, position

    def follow(self, cid: str, *, done: Callable[[], bool], tail: int | None = None,
               poll: float = 0.2) -> Iterator[bytes]:
        """The log, then what is written to it, until ``done()`` says the task has
        finished writing (asked between polls); what was written before that is
        read to the end."""
        chunks, (inode, offset) = self._snapshot(cid, tail=tail)
        yield from chunks
        while True:
            finished = done()
            new, inode, offset = self._grown(cid, inode, offset)
            yield from new
            if finished:
                return
            time.sleep(poll)

    def _grown(self, cid: str, inode: int, offset: int) -> tuple[list[bytes], int, int]:
        """What was written since (``inode``, ``offset``): the rest of the rotated
        file when the log was rotated, then the new log's contents."""
        current = self.path(cid)
        out: list[bytes] = []
        try:
            st = current.stat()
        except FileNotFoundError:
            return out, inode, offset
        if st.st_ino != inode:
            rotated = current.with_name(current.name + ".1")
            try:
                with open(rotated, "rb") as f:
                    if os.fstat(f.fileno()).st_ino == inode:
                        f.seek(offset)
                        while chunk := f.read(_CHUNK):
                            out.append(chunk)
            except FileNotFoundError:
                pass
            inode, offset = st.st_ino, 0
        try:
            with open(current, "rb") as f:
                if os.fstat(f.fileno()).st_ino != inode:
                    return out, inode, offset  # rotated again meanwhile: next poll
                f.seek(offset)
                while chunk := f.read(_CHUNK):
                    out.append(chunk)
                offset = f.tell()
        except FileNotFoundError:
            pass
        return out, inode, offset


def _last_lines(data: bytes, n: int) -> bytes:
    """The last ``n`` lines of ``data`` (a last line without a newline counts)."""
    if n <= 0:
        return b""
    lines: deque[bytes] = deque(data.splitlines(keepends=True), maxlen=n)
    return b"".join(lines)
