"""Is a task's command there to run? Asked of the rootfs before runc is.

When runc cannot exec the container's command it prints its error on its own
stderr (the container's, so lamina cannot hold it back) and lamina then
reports the same failure again. Looking the command up first, the way runc
will (``$PATH`` of the process environment when the name has no slash, else
the path itself, relative to the working directory), turns the common case
into one line and the exit codes shells and docker use: 127 when the command
is not found, 126 when it is found but cannot be run. Those codes are the
container's exit-code space, which a foreground ``run`` returns: NotFound's 3
would read as the command exiting 3.

A lookup that reaches into a bind mount or a kernel filesystem (``/proc``...)
is left to runc: the rootfs alone does not know what will be there.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lamina.errors import FailedPrecondition, NotFound

from .spec import resolve_in_root

__all__ = ["CommandNotExecutable", "CommandNotFound", "check_command"]


class CommandNotFound(NotFound, exit_code=127, shown_as_base=True):
    """The task's command is not in the container (exit 127, as a shell's)."""


class CommandNotExecutable(FailedPrecondition, exit_code=126, shown_as_base=True):
    """The task's command is there but is no executable file (exit 126, as a shell's)."""


def _under(path: str, tops: Iterable[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in tops)


def _is_executable(path: Path) -> bool | None:
    """True: a file with an execute bit; False: something else; None: nothing there."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return True  # cannot tell: let runc decide
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def check_command(spec: Mapping[str, Any], rootfs: str | os.PathLike[str]) -> None:
    """Raise :class:`CommandNotFound` or :class:`CommandNotExecutable` when runc would
    fail to exec ``spec``'s process in ``rootfs`` (mounted where the image's files are)."""
    process = spec.get("process") or {}
    args = process.get("args") or []
    if not args:
        return
    name = str(args[0])
    mounted = [str(m.get("destination", "")) for m in spec.get("mounts") or []]
    if "/" in name:
        path = posixpath.normpath(posixpath.join(str(process.get("cwd") or "/"), name))
        if _under(path, mounted):
            return
        found = _is_executable(resolve_in_root(rootfs, path))
        if found is None:
            raise CommandNotFound(f'exec: "{name}": no such file or directory')
        if not found:
            raise CommandNotExecutable(f'exec: "{name}": permission denied')
        return
    env = [str(e) for e in process.get("env") or []]
    search = next((e[len("PATH="):] for e in env if e.startswith("PATH=")), "")
    dirs = [d for d in search.split(":") if d.startswith("/")]
    if any(_under(d, mounted) for d in dirs):
        return
    if not any(_is_executable(resolve_in_root(rootfs, posixpath.join(d, name))) for d in dirs):
        raise CommandNotFound(f'exec: "{name}": executable file not found in $PATH')
