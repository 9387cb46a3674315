"""Run a command under strace and read back the file-system calls it made.

strace runs with ``-f`` (threads and children), ``-y`` (every descriptor with
the path it names), ``-xx`` (every string, path and written buffer in hex, so
nothing in an argument can look like syntax) and a string limit large enough
that no written buffer is cut (a cut one is refused, not guessed).

A call another thread interrupted is printed in two halves (``<unfinished
...>`` and ``<... resumed>``); the halves are joined and the call is placed
where it returned. Failed calls are dropped: they changed nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SYSCALLS", "Call", "TraceError", "parse", "run_traced"]

#: What is traced: everything that changes a file or a directory, what makes it
#: durable, and what moves a descriptor's offset (``write`` has no offset of its own).
SYSCALLS = (
    "open,openat,openat2,creat,write,pwrite64,writev,pwritev,pwritev2,lseek,"
    "fsync,fdatasync,syncfs,sync,sync_file_range,"
    "rename,renameat,renameat2,link,linkat,unlink,unlinkat,mkdir,mkdirat,rmdir,"
    "symlink,symlinkat,mknod,mknodat,truncate,ftruncate,fallocate,"
    "chmod,fchmod,fchmodat,chown,fchown,lchown,fchownat,"
    "setxattr,lsetxattr,fsetxattr,removexattr,lremovexattr,fremovexattr,"
    "utimensat,sendfile,copy_file_range,splice,mount,umount2"
)

#: Large enough for any single write lamina makes (chunks are at most a few MiB).
STRING_LIMIT = 64 << 20


class TraceError(Exception):
    """The trace holds something this reader cannot model faithfully."""


@dataclass(frozen=True)
class Call:
    """One completed system call: its name, its arguments as strace printed them
    (split at the top level), and its return value (with ``<path>`` for a new fd)."""

    seq: int
    pid: int
    name: str
    args: tuple[str, ...]
    ret: str


def run_traced(argv: Sequence[str], trace_file: Path, *, env: dict[str, str] | None = None,
               cwd: str | None = None, umask: int = 0o022,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` under strace with ``umask``, the trace into ``trace_file``."""
    cmd = ["strace", "-f", "-y", "-xx", "-s", str(STRING_LIMIT), "-e", f"trace={SYSCALLS}",
           "-o", str(trace_file), "--", *argv]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False, preexec_fn=lambda: os.umask(umask))


_LINE = re.compile(r"^(\d+) +(.*)$")
_START = re.compile(r"^([a-z_0-9]+)\((.*)$", re.S)
_UNFINISHED = " <unfinished ...>"
_RESUMED = re.compile(r"^<\.\.\. ([a-z_0-9]+|\?\?\?) resumed>(.*)$", re.S)
# strace names a call it cannot name (a thread torn down mid-call as its process
# exits, an unknown number) "???": none of the calls traced, so it is passed over
_UNNAMED = "???("
_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_RETURN = re.compile(r"\) *= ")


def parse(trace_file: Path) -> Iterator[Call]:
    """The successful calls of ``trace_file``, in the order they returned."""
    pending: dict[int, tuple[str, str]] = {}
    seq = 0
    with open(trace_file, encoding="ascii", errors="strict") as f:
        for raw in f:
            m = _LINE.match(raw.rstrip("\n"))
            if m is None:
                raise TraceError(f"unreadable trace line: {raw[:200]!r}")
            pid, rest = int(m.group(1)), m.group(2)
            if rest.startswith(("---", "+++")):
                continue
            if rest.startswith(_UNNAMED):
                pending.pop(pid, None)
                continue
            if rest.endswith(_UNFINISHED):
                sm = _START.match(rest[: -len(_UNFINISHED)])
                if sm is None:
                    raise TraceError(f"unreadable trace line: {raw[:200]!r}")
                pending[pid] = (sm.group(1), sm.group(2))
                continue
            rm = _RESUMED.match(rest)
            if rm is not None and rm.group(1) == "???":
                pending.pop(pid, None)
                continue
            if rm is not None:
                name, head = pending.pop(pid, (rm.group(1), ""))
                body = head + rm.group(2)
            else:
                sm = _START.match(rest)
                if sm is None:
                    raise TraceError(f"unreadable trace line: {raw[:200]!r}")
                name, body = sm.group(1), sm.group(2)
            call = _complete(pid, name, body, seq)
            if call is not None:
                seq += 1
                yield call


def _complete(pid: int, name: str, body: str, seq: int) -> Call | None:
    """Split ``args) = ret`` (None for a failed or unfinished-forever call)."""
    body = _COMMENT.sub("", body)
    ends = list(_RETURN.finditer(body))
    if not ends:
        raise TraceError(f"{name}: no return value in {body[:200]!r}")
    cut = ends[-1].start()
    ret = body[ends[-1].end():].strip()
    if ret.startswith("-1 ") or ret == "?":
        return None
    args = tuple(split_args(body[:cut]))
    for a in args:
        if a.endswith('"...') or '"...' in a:
            raise TraceError(f"{name}: a string was cut short (raise STRING_LIMIT)")
    return Call(seq, pid, name, args, ret)


def split_args(text: str) -> Iterator[str]:
    """Top-level comma-separated arguments (brackets, braces, quotes and ``<..>`` nest)."""
    depth = 0
    quoted = False
    start = 0
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "[{(<":
            depth += 1
        elif c in "]})>":
            depth -= 1
        elif c == "," and depth == 0:
            yield text[start:i].strip()
            start = i + 1
        i += 1
    last = text[start:].strip()
    if last:
        yield last


def unhex(s: str) -> bytes:
    """A ``-xx`` string (``"\\x2f\\x74"``) as bytes; the quotes are optional."""
    s = s.strip()
    if s.startswith('"'):
        s = s[1:s.rindex('"')]
    if not s:
        return b""
    if not s.startswith("\\x"):
        raise TraceError(f"not a hex string: {s[:80]!r}")
    return bytes.fromhex(s.replace("\\x", ""))


_ANNOTATED = re.compile(r"^(-?\w+)<(.*)>$", re.S)


def fd_path(arg: str) -> tuple[str, str | None]:
    """``3<\\x2f...>`` as ("3", "/..."); an fd strace could not name as (fd, None)."""
    m = _ANNOTATED.match(arg.strip())
    if m is None:
        return arg.strip(), None
    inner = m.group(2)
    if not inner.startswith("\\x"):
        return m.group(1), None  # pipe:[..], socket:[..], anon_inode:...
    return m.group(1), os.fsdecode(unhex(inner))
