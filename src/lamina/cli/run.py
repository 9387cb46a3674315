"""``lamina run``: create a container and start its task (foreground or detached)."""

from __future__ import annotations

import argparse
import contextlib

from lamina.cli.app import App
from lamina.cli.common import parse_labels
from lamina.cli.container import add_create_flags, options_from_args, services
from lamina.errors import InvalidArgument, LaminaError

__all__ = ["register"]


def _run(args: argparse.Namespace, app: App) -> int:
    if args.rm and args.detach:
        raise InvalidArgument("--rm and -d do not go together (a detached task outlives run)")
    labels = parse_labels(args.label)
    with services(app) as ct:
        ct.create(args.image, args.id, labels=labels, options=options_from_args(args))
        try:
            info = ct.start(args.id, detach=args.detach)
        except BaseException:
            if args.rm:
                with contextlib.suppress(LaminaError):
                    ct.remove(args.id, force=True)
            raise
        if args.detach:
            print(info.pid)
            return 0
        code = info.exit_code if info.exit_code is not None else 255
        with contextlib.suppress(LaminaError):
            ct.tasks.delete(args.id, force=True)
        if args.rm:
            ct.remove(args.id, force=True, sync=True)
    return code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = sub.add_parser("run", help="create a container and run its task")
    v.add_argument("--rm", action="store_true", help="remove the container when it exits")
    v.add_argument("-d", "--detach", action="store_true",
                   help="run in the background; print the pid")
    add_create_flags(v)
    v.set_defaults(handler=_run)
