"""``lamina diff apply``: apply a layer onto an active snapshot."""

from __future__ import annotations

import argparse
import os
from typing import IO

from lamina.archive.apply import AppliedLayer
from lamina.cli.app import App
from lamina.cli.common import add_max_layer_size, max_layer_size
from lamina.differ import apply_stream

__all__ = ["register"]


def cmd_apply(args: argparse.Namespace, app: App) -> int:
    mounts = app.snapshots().mounts(args.key)

    def apply(layer: IO[bytes]) -> AppliedLayer:
        return apply_stream(layer, mounts, diff_id=args.diff_id, tmpmounts=app.tmpmounts,
                            max_layer_size=max_layer_size(args))

    if os.path.exists(args.layer):
        with open(args.layer, "rb") as f:
            applied = apply(f)
    else:
        with app.content().reader(args.layer) as r:
            applied = apply(r)
    print(applied.diff_id)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("diff", help="apply layers onto snapshots")
    verbs = group.add_subparsers(dest="diff_command", metavar="VERB", required=True)
    p = verbs.add_parser("apply", help="apply a layer onto an active snapshot",
                         description="Apply LAYER onto active snapshot KEY and print the "
                         "layer's DiffID.")
    p.add_argument("--diff-id", default=None, metavar="DIGEST",
                   help="fail unless the layer has this DiffID")
    add_max_layer_size(p)
    p.add_argument("layer", metavar="LAYER",
                   help="a layer tar file (compressed or not), or a blob's digest")
    p.add_argument("key", metavar="KEY", help="the active snapshot to apply it to")
    p.set_defaults(handler=cmd_apply)
