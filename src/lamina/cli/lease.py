"""``lamina lease``: create, list and remove leases (protection from ``gc``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

from lamina.cli.app import App
from lamina.cli.common import parse_labels, print_table, told_damaged
from lamina.errors import LaminaError
from lamina.metadata.leases import DEFAULT_EXPIRY, Lease, LeaseManager, parse_duration

__all__ = ["register"]


@contextlib.contextmanager
def _manager(app: App) -> Iterator[LeaseManager]:
    yield app.store_root.leases()


def _record(lease: Lease, now: datetime) -> dict[str, object]:
    return {"id": lease.id, "created": lease.created.isoformat(),
            "expires": lease.expires.isoformat() if lease.expires else None,
            "active": lease.active(now), "labels": dict(lease.labels)}


def _create(args: argparse.Namespace, app: App) -> int:
    if args.expire in ("never", "none"):
        expire = None
    else:
        expire = parse_duration(args.expire) if args.expire else DEFAULT_EXPIRY
    with _manager(app) as leases:
        lease = leases.create(args.id, expire=expire, labels=parse_labels(args.label))
    print(lease.id)
    return 0


def _ls(args: argparse.Namespace, app: App) -> int:
    with _manager(app) as leases:
        found, damaged = leases.readable()  # a damaged one is told after the others
    now = datetime.now(UTC)
    if args.json:
        app.print_json([_record(lease, now) for lease in found])
        return told_damaged(damaged)
    if args.quiet:
        for lease in found:
            print(lease.id)
        return told_damaged(damaged)
    rows = []
    for lease in found:
        expires = lease.expires.isoformat(timespec="seconds") if lease.expires else "never"
        if not lease.active(now):
            expires += " (expired)"
        labels = ",".join(f"{k}={v}" for k, v in sorted(lease.labels.items()))
        rows.append([lease.id, lease.created.isoformat(timespec="seconds"), expires, labels])
    print_table(("ID", "CREATED", "EXPIRES", "LABELS"), rows, widths=(40, 26, 26))
    return told_damaged(damaged)


def _rm(args: argparse.Namespace, app: App) -> int:
    from lamina.metadata.deletes import delete_lease

    root = app.store_root
    code = 0
    for i, lease_id in enumerate(args.ids, 1):
        try:
            # collected with the last, when every delete before it went well
            delete_lease(root, lease_id, sync=args.sync and i == len(args.ids) and code == 0)
        except LaminaError as exc:
            print(f"lamina: {exc.one_line()}", file=sys.stderr)
            code = code or exc.exit_code
        else:
            print(lease_id)
    return code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lease", aliases=["leases"], help="manage leases")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    v = verbs.add_parser("create", help="create a lease; prints its id")
    v.add_argument("--id", default=None, metavar="ID", help="the lease id (default: generated)")
    v.add_argument("--expire", default=None, metavar="DURATION",
                   help="expire after DURATION (90s, 10m, 2h, 1d; 'never'); default 1h")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label (containerd.io/gc.ref.* labels protect what they name)")
    v.set_defaults(handler=_create)

    v = verbs.add_parser("ls", aliases=["list"], help="list leases")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.add_argument("-q", "--quiet", action="store_true", help="ids only")
    v.set_defaults(handler=_ls)

    v = verbs.add_parser("rm", aliases=["remove", "delete"], help="remove leases")
    v.add_argument("ids", nargs="+", metavar="ID", help="leases to remove")
    v.add_argument("--sync", action="store_true", help="garbage-collect afterwards")
    v.set_defaults(handler=_rm)
