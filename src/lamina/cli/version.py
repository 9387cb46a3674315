"""``lamina version``: this client's version and, with ``--address``, the server's."""

from __future__ import annotations

import argparse
import platform

from lamina import __version__
from lamina.cli.app import App

__all__ = ["register"]


def cmd_version(args: argparse.Namespace, app: App) -> int:
    print("Client:")
    print(f"  Version:  {__version__}")
    print(f"  Python:   {platform.python_version()}")
    if app.address:
        from lamina.api.version import server_version

        version, revision = server_version(app.address)
        print()
        print("Server:")
        print(f"  Address:  {app.address}")
        print(f"  Version:  {version}")
        if revision:
            print(f"  Revision: {revision}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "version",
        help="print lamina's version (and the server's)",
        description="Print lamina's version; with the global --address, also the version "
        "of the 'lamina serve' there (containerd's Version service).",
    )
    p.set_defaults(handler=cmd_version)
