"""``lamina gc``: remove the blobs and snapshots nothing references any more."""

from __future__ import annotations

import argparse

from lamina.cli.app import App
from lamina.errors import printable
from lamina.metadata.gc import collect

__all__ = ["register"]


def _gc(args: argparse.Namespace, app: App) -> int:
    report = collect(app.store_root, dry_run=args.dry_run)
    if args.json:
        app.print_json(report.to_json())
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for digest, size in report.content:
        print(f"{verb} content {digest}\t{size}")
    released = "would release" if report.dry_run else "released"
    for digest in report.released:
        print(f"{released} content {digest}\t(containerd still holds it)")
    for name, key, size in report.snapshots:
        print(f"{verb} snapshot {name}/{printable(key)}\t{size}")
    freed = "would free" if report.dry_run else "freed"
    print(f"{len(report.content)} blobs, {len(report.snapshots)} snapshots; "
          f"{freed} {report.bytes_freed} bytes")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gc", help="garbage-collect unreferenced content and snapshots")
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="only say what would be removed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_gc)
