"""``lamina run``: create a container and start its task, in docker's and nerdctl's form.

``lamina run [flags] IMAGE [COMMAND [ARG...]]``: flags come before the image,
everything after it is the command. The container is named by ``--name`` or
gets a random 12-hex-digit ID, printed (as nerdctl prints its ID) when the
task runs detached. ``lamina container create IMAGE ID [CMD...]`` keeps ctr's
form.

``-t`` sets ``terminal: true`` in the runtime spec and leaves the terminal to
runc: ``runc run`` in the foreground makes the pseudo-terminal, receives its
master over a socket pair of its own, copies between it and lamina's
terminal (set raw, restored at the end) and passes window size changes on;
the first size is in the spec (``process.consoleSize``), so the command sees
it from its start.
A console socket of lamina's would only be needed for a detached task,
where nobody is there to type: ``-t`` and ``-i`` need the foreground.

``--rm`` with ``-d`` leaves a small process behind that removes the container
when its task ends (:mod:`lamina.containers.autoremove`).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import subprocess
import sys
from pathlib import Path

from lamina.cli.app import App
from lamina.cli.common import add_examples, parse_labels
from lamina.cli.container import add_create_flags, options_from_args, services
from lamina.cli.terminal import (
    add_terminal_flags,
    check_terminal_flags,
    stdio_of,
    terminal_size,
)
from lamina.errors import LaminaError

__all__ = ["register"]


def _remove_after_exit(app: App, cid: str, log: Path) -> None:
    """Start the process that removes ``cid`` when its detached task ends (see
    :mod:`lamina.containers.autoremove`); what goes wrong there is in ``log``."""
    argv = [sys.executable, "-m", "lamina", "--root", app.root, "--snapshotter",
            app.snapshotter, "container", "rm", "--after-exit", cid]
    with open(log, "ab") as out:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
                         start_new_session=True, close_fds=True)


def _run(args: argparse.Namespace, app: App) -> int:
    check_terminal_flags(args)
    cid = args.name or secrets.token_hex(6)
    labels = parse_labels(args.label)
    options = options_from_args(args)
    stdio = stdio_of(args)
    with services(app) as ct:
        ct.create(args.image, cid, labels=labels, options=options)
        try:
            info = ct.start(cid, detach=args.detach, terminal=args.tty,
                            console_size=terminal_size() if args.tty else None, stdio=stdio)
        except BaseException:
            if args.rm:
                with contextlib.suppress(LaminaError):
                    ct.remove(cid, force=True)
            raise
        if args.detach:
            if args.rm:
                _remove_after_exit(app, cid, ct.tasks.bundle(cid) / "autoremove.log")
            print(cid)
            return 0
        code = info.exit_code if info.exit_code is not None else 255
        with contextlib.suppress(LaminaError):
            ct.tasks.delete(cid, force=True)
        if args.rm:
            ct.remove(cid, force=True, sync=True)
    return code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = sub.add_parser(
        "run", help="create a container and run a command in it",
        description="Create a container on IMAGE and run COMMAND (default: the image's) "
        "in it, in docker's and nerdctl's form: flags go before IMAGE, everything after "
        "IMAGE is the command. The container's ID is --name, or 12 random hex digits.")
    v.add_argument("--name", metavar="ID",
                   help="the container's ID (default: 12 random hex digits)")
    v.add_argument("--rm", action="store_true",
                   help="remove the container when its task ends (with -d too: a small "
                   "background process waits for the end)")
    add_terminal_flags(v, detached="run in the background; print the container's ID")
    add_create_flags(v)
    v.add_argument("image", metavar="IMAGE", help="the image the container runs")
    v.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="command and arguments (replace the image's Cmd)")
    add_examples(
        v,
        ("a shell on a terminal, the container removed at its end",
         "lamina run -it --rm -e A=1 -v /srv:/srv alpine:3 sh"),
        ("a named container in the background (prints its ID), then its output",
         "lamina run -d --name web -w /srv -u 1000:1000 alpine:3 httpd -f\n"
         "lamina logs web"),
    )
    v.set_defaults(handler=_run)
