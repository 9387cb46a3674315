"""``lamina logs``: what a container's detached task wrote (nerdctl's ``logs``)."""

from __future__ import annotations

import argparse
import sys

from lamina.cli.app import App
from lamina.cli.container import services

__all__ = ["add_logs_flags", "register"]


def _logs(args: argparse.Namespace, app: App) -> int:
    out = sys.stdout.buffer
    sys.stdout.flush()
    with services(app) as ct:
        for chunk in ct.logs(args.id, follow=args.follow, tail=args.tail):
            out.write(chunk)
            if args.follow:
                out.flush()
    out.flush()
    return 0


def _lines(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of lines: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def add_logs_flags(v: argparse.ArgumentParser) -> None:
    """The arguments of ``logs`` (also ``task logs``)."""
    v.add_argument("-f", "--follow", action="store_true",
                   help="keep printing what the task writes until it stops")
    v.add_argument("-n", "--tail", type=_lines, default=None, metavar="N",
                   help="only the last N lines of what is kept")
    v.add_argument("id", metavar="ID", help="the container")
    v.set_defaults(handler=_logs)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = sub.add_parser("logs", help="print a container's output",
                       description="Print a container's output: what its detached tasks "
                       "wrote on stdout and stderr (the newest 10 MiB are kept).")
    add_logs_flags(v)
