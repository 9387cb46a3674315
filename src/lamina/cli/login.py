"""``lamina login`` / ``lamina logout``: registry credentials in docker's config.json."""

from __future__ import annotations

import argparse
import getpass
import sys

from lamina.cli.app import App
from lamina.errors import InvalidArgument

__all__ = ["register"]


def _login(args: argparse.Namespace, app: App) -> int:
    del app
    from lamina.cli.image_remote import open_registry
    from lamina.remotes.auth import Credentials, DockerConfig
    from lamina.remotes.login import check_login

    user = args.username
    password = args.password
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    if not user:
        if not sys.stdin.isatty():
            raise InvalidArgument("login: --username is required when not on a terminal")
        user = input("Username: ")
    if password is None:
        if not sys.stdin.isatty():
            raise InvalidArgument("login: give --password-stdin when not on a terminal")
        password = getpass.getpass("Password: ")
    creds = Credentials(user, password)
    args.user = None
    with open_registry(args) as registry:
        check_login(registry, args.server, creds)
    where = DockerConfig().store(args.server, creds)
    print(f"Login succeeded for {user} at {args.server} (saved in {where})")
    return 0


def _logout(args: argparse.Namespace, app: App) -> int:
    del app
    from lamina.remotes.auth import DockerConfig

    if DockerConfig().erase(args.server):
        print(f"Removed the credentials of {args.server}")
    else:
        print(f"Not logged in to {args.server}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from lamina.cli.image_remote import add_registry_flags

    v = sub.add_parser("login", help="check and save credentials for a registry")
    v.add_argument("server", metavar="REGISTRY", help="host[:port], e.g. registry.example.com")
    v.add_argument("--username", "-U", default="",
                   help="the user name (asked for on a terminal when not given)")
    v.add_argument("--password", "-p", default=None,
                   help="the password (visible to other users: prefer --password-stdin)")
    v.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_registry_flags(v)
    v.set_defaults(handler=_login)

    v = sub.add_parser("logout", help="forget the credentials of a registry")
    v.add_argument("server", metavar="REGISTRY", help="host[:port] logged in to")
    v.set_defaults(handler=_logout)
