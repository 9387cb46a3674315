"""``lamina config``: configuration snippets for the tools lamina works with."""

from __future__ import annotations

import argparse
import json

from lamina.cli.app import App

__all__ = ["containerd_snippet", "register"]


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def containerd_snippet(address: str, *, name: str = "lamina", content: bool = False) -> str:
    """containerd (config version 2) ``[proxy_plugins]`` entries for ``lamina serve``."""
    addr = _toml_str(address)
    c = "" if content else "# "
    return f"""\
# lamina as containerd proxy plugins (containerd config version 2).
# Merge into containerd's config.toml, start `lamina serve --address {address}`,
# restart containerd, then e.g. `ctr snapshots --snapshotter {name} ls` or
# `ctr images pull --snapshotter {name} ...`.
version = 2

[proxy_plugins]
  [proxy_plugins.{name}]
    type = "snapshot"
    address = {addr}

  # Optional: lamina's content store as well. containerd's metadata store
  # uses one content plugin, its built-in one unless that is disabled:
  #   disabled_plugins = ["io.containerd.content.v1.content"]
  {c}[proxy_plugins.{name}-content]
  {c}  type = "content"
  {c}  address = {addr}
"""


def cmd_containerd(args: argparse.Namespace, app: App) -> int:
    from lamina.api import default_address

    address = args.config_address or app.address or default_address()
    print(containerd_snippet(address, name=args.name, content=args.content), end="")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser(
        "config", help="print configuration for other tools", description=__doc__
    )
    sub = group.add_subparsers(dest="config_command", metavar="TOOL", required=True)
    p = sub.add_parser(
        "containerd",
        help="containerd [proxy_plugins] snippet for `lamina serve`",
        description="Print containerd config v2 [proxy_plugins] entries for lamina.",
    )
    p.add_argument(
        "--address",
        dest="config_address",
        metavar="PATH",
        default=None,
        help="the socket `lamina serve` listens on (default: the global --address, "
        "$LAMINA_ADDRESS or /run/lamina/lamina.sock)",
    )
    p.add_argument("--name", default="lamina", help="proxy plugin name (default lamina)")
    p.add_argument(
        "--content",
        action="store_true",
        help="enable the content proxy entry (commented out by default)",
    )
    p.set_defaults(handler=cmd_containerd)
