"""``lamina checkpoint``: list and inspect checkpoint images; create/restore (as ``container``)."""

from __future__ import annotations

import argparse

from lamina.cli import container as container_cli
from lamina.cli.app import App
from lamina.cli.common import print_table

__all__ = ["register"]


def _ls(args: argparse.Namespace, app: App) -> int:
    with container_cli.services(app) as ct:
        rows = [{"ref": c.ref, "digest": c.index.digest, "container": c.config.get("id"),
                 "image": c.config.get("image"), "created": c.config.get("created"),
                 "binds": len(c.binds), "exited": c.config.get("exited")}
                for c in ct.list_checkpoints()]
    if args.json:
        app.print_json(rows)
        return 0
    print_table(("REF", "CONTAINER", "IMAGE", "CREATED"),
                ([str(r["ref"]), str(r["container"]), str(r["image"]), str(r["created"])]
                 for r in rows),
                widths=(48, 20, 32))
    return 0


def _inspect(args: argparse.Namespace, app: App) -> int:
    with container_cli.services(app) as ct:
        ckpt = ct.read_checkpoint(args.ref)
    app.print_json({
        "ref": ckpt.ref,
        "index": ckpt.index.to_json(),
        "annotations": dict(ckpt.annotations),
        "criu": ckpt.criu.to_json(),
        "rw": ckpt.rw.to_json() if ckpt.rw else None,
        "binds": [b.to_json() for b in ckpt.binds],
        "image_target": ckpt.image_target.to_json() if ckpt.image_target else None,
        "config": dict(ckpt.config),
    })
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("checkpoint", aliases=["checkpoints"],
                       help="list, inspect, create and restore checkpoints")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    v = verbs.add_parser("ls", aliases=["list"], help="list checkpoint images")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(handler=_ls)

    v = verbs.add_parser("inspect", help="a checkpoint's parts and config as JSON")
    v.add_argument("ref", metavar="REF", help="the checkpoint image's name")
    v.set_defaults(handler=_inspect)

    v = verbs.add_parser("create", help="same as 'lamina container checkpoint'")
    container_cli.add_checkpoint_flags(v)

    v = verbs.add_parser("restore", help="same as 'lamina container restore'")
    container_cli.add_restore_flags(v)
