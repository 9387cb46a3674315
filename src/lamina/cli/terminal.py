"""docker's -t, -i and -d, as ``run`` and ``exec`` take them.

-t and -i need the foreground: lamina has no attach, so nobody would be there
to type into a detached task's terminal. runc makes the pseudo-terminal
itself when it runs in the foreground (no console socket of lamina's).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys

from lamina.containers.runtime import Stdio
from lamina.errors import InvalidArgument, NotImplementedErr

__all__ = ["add_terminal_flags", "check_terminal_flags", "stdio_of", "terminal_size"]


def add_terminal_flags(v: argparse.ArgumentParser, *, detached: str) -> None:
    """-d (``detached``: its help), -t and -i."""
    v.add_argument("-d", "--detach", action="store_true", help=detached)
    v.add_argument("-t", "--tty", action="store_true",
                   help="give the command a pseudo-terminal joined to this one (raw mode "
                   "while it runs, window size passed on)")
    v.add_argument("-i", "--interactive", action="store_true",
                   help="keep standard input attached (without it the command reads "
                   "nothing)")


def check_terminal_flags(args: argparse.Namespace) -> None:
    """-t and -i with -d, or -t without a terminal, are refused before anything runs."""
    if args.detach and (args.tty or args.interactive):
        raise NotImplementedErr("-t and -i need the task in the foreground (lamina has no "
                                "attach); leave out -d, or -t and -i")
    if args.tty and not any(f.isatty() for f in (sys.stdin, sys.stdout, sys.stderr)):
        raise InvalidArgument("-t: lamina's standard input, output and error are not "
                              "terminals; leave out -t")


def stdio_of(args: argparse.Namespace) -> Stdio:
    """The task's streams: this process's standard input with -i, else nothing (and
    runc copies nothing to a pty); with -d, nothing for its output either (this
    process does not stay to show it)."""
    quiet = subprocess.DEVNULL if args.detach else None
    return Stdio(stdin=None if args.interactive else subprocess.DEVNULL,
                 stdout=quiet, stderr=quiet)


def terminal_size() -> tuple[int, int] | None:
    """Rows and columns of this process's terminal (the first of stdin, stdout, stderr)."""
    for f in (sys.stdin, sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            size = os.get_terminal_size(f.fileno())
            return size.lines, size.columns
    return None
