"""``lamina rootless stop``: end an unprivileged user's namespace holder."""

from __future__ import annotations

import argparse

from lamina import rootless
from lamina.cli.app import App
from lamina.errors import NotImplementedErr

__all__ = ["register"]


def _stop(args: argparse.Namespace, app: App) -> int:
    if app.address:
        raise NotImplementedErr(f"{app.command} works on this machine's namespaces, not "
                                f"through --address {app.address}")
    stopped = rootless.stop()
    if stopped is None:
        print("no namespace holder to stop")
        return 0
    gone = (f"{len(stopped.mounts)} mount(s) only it had went with it: "
            + ", ".join(stopped.mounts) if stopped.mounts else "it had no mounts of its own")
    print(f"stopped lamina's namespace holder (pid {stopped.pid}); {gone}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "rootless", help="an unprivileged user's namespaces (stop their holder)",
        description="Without root, lamina works in a user and a mount namespace held by "
        "a 'sleep infinity' process, so mounts outlive the command that made them.")
    verbs = p.add_subparsers(dest="rootless_command", metavar="VERB", required=True)
    v = verbs.add_parser(
        "stop", help="end the namespace holder; its mounts go with it",
        description="End the namespace holder: the namespaces, and every mount made in "
        "them (image mount, snapshot mount), go with it; the next command makes new "
        "ones. Refused (exit 5) while other processes, a container's say, are in the "
        "namespace; says which mounts went.")
    v.set_defaults(handler=_stop)
