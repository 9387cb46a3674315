"""``lamina content``: manage blobs and ingests, like ``ctr content``."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from datetime import UTC, datetime
from typing import Any

from lamina.cli.app import App
from lamina.cli.common import human_size, parse_labels, print_table
from lamina.content import Info, Status, set_labels
from lamina.errors import AlreadyExists, InvalidArgument, NotFound
from lamina.owners import OWNERS

__all__ = ["info_json", "register", "status_json"]

COPY_CHUNK = 1 << 20


def info_json(info: Info) -> dict[str, Any]:
    """A blob's :class:`Info` as a JSON-able dict (times in ISO 8601)."""
    return {
        "digest": info.digest,
        "size": info.size,
        "created": info.created.isoformat(),
        "updated": info.updated.isoformat(),
        "labels": dict(sorted(info.labels.items())),
    }


def status_json(st: Status) -> dict[str, Any]:
    """An ingest's :class:`Status` as a JSON-able dict."""
    return {
        "ref": st.ref,
        "offset": st.offset,
        "total": st.total,
        "expected": st.expected,
        "started_at": st.started_at.isoformat(),
        "updated_at": st.updated_at.isoformat(),
    }


def _age(t: datetime) -> str:
    seconds = max(0, int((datetime.now(UTC) - t).total_seconds()))
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds // span}{unit}"
    return f"{seconds}s"


def _ls(args: argparse.Namespace, app: App) -> int:
    store = app.content()
    infos = list(store.walk(*args.filters))
    holders_of = getattr(store, "holders", None)  # lamina.owners; unknown with --address
    holders: dict[str, frozenset[str]] | None = holders_of() if callable(holders_of) else None

    def owners(digest: str) -> str:
        assert holders is not None
        return ",".join(sorted(holders.get(digest, ()), key=OWNERS.index)) or "-"

    if args.json:
        app.print_json([info_json(i) | ({"owners": owners(i.digest).split(",")}
                                        if holders is not None else {}) for i in infos])
        return 0
    if args.quiet:
        for i in infos:
            print(i.digest)
        return 0
    labels = [",".join(f"{k}={v}" for k, v in sorted(i.labels.items())) or "-" for i in infos]
    if holders is None:
        print_table(("DIGEST", "SIZE", "AGE", "LABELS"),
                    ((i.digest, human_size(i.size), _age(i.created), lb)
                     for i, lb in zip(infos, labels, strict=True)))
        return 0
    print_table(("DIGEST", "SIZE", "AGE", "OWNERS", "LABELS"),
                ((i.digest, human_size(i.size), _age(i.created), owners(i.digest), lb)
                 for i, lb in zip(infos, labels, strict=True)))
    return 0


def _get(args: argparse.Namespace, app: App) -> int:
    out = sys.stdout.buffer
    with app.content().reader(args.digest) as r:
        shutil.copyfileobj(r, out, COPY_CHUNK)
    out.flush()
    return 0


def _ingest(args: argparse.Namespace, app: App) -> int:
    store = app.content()
    labels = parse_labels(args.label)
    size, expected = args.expected_size, args.expected_digest
    if size < 0:
        raise InvalidArgument(f"invalid --expected-size {size}")
    source = sys.stdin.buffer
    try:
        w = store.writer(args.ref, total=size, expected=expected)
    except AlreadyExists:
        print(expected)  # already there: nothing to ingest
        return 0
    try:
        if w.offset:
            try:
                source.seek(w.offset)
            except OSError:  # a pipe: start the ingest over
                w.truncate(0)
        while chunk := source.read(COPY_CHUNK):
            w.write(chunk)
        digest = w.digest()
        with contextlib.suppress(AlreadyExists):  # there already; the ingest is dropped
            w.commit(size, expected, labels=labels or None)
    finally:
        w.close()
    print(digest)
    return 0


def _rm(args: argparse.Namespace, app: App) -> int:
    store = app.content()
    code = 0
    for digest in args.digests:
        try:
            store.delete(digest)
        except NotFound as exc:
            print(f"lamina: {exc.one_line()}", file=sys.stderr)
            code = NotFound.exit_code
            continue
        print(digest)
    return code


def _label(args: argparse.Namespace, app: App) -> int:
    store = app.content()
    labels = parse_labels(args.labels)
    info = store.info(args.digest)
    if not labels:  # nothing to change: show the labels
        print(",".join(f"{k}={v}" for k, v in sorted(info.labels.items())))
        return 0
    updated = set_labels(store, args.digest, labels, info=info)
    print(",".join(f"{k}={v}" for k, v in sorted(updated.labels.items())))
    return 0


def _active(args: argparse.Namespace, app: App) -> int:
    statuses = app.content().list_statuses(*args.filters)
    if args.json:
        app.print_json([status_json(s) for s in statuses])
        return 0
    print_table(
        ("REF", "SIZE", "TOTAL", "AGE"),
        ((s.ref, human_size(s.offset), human_size(s.total) if s.total else "-",
          _age(s.started_at)) for s in statuses),
    )
    return 0


def _abort(args: argparse.Namespace, app: App) -> int:
    for ref in args.refs:
        app.content().abort(ref)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("content", help="manage content (blobs and ingests)",
                                   description="Manage the content store: blobs by digest, "
                                   "and ingests (writes in progress) by name.")
    sub = parser.add_subparsers(dest="content_command", metavar="COMMAND", required=True)

    p = sub.add_parser("ls", aliases=["list"],
                       help="list blobs and their owners",
                       description="List blobs matching the filters, with their owners "
                       "(lamina, containerd).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print digests only")
    p.add_argument("filters", nargs="*", metavar="FILTER",
                   help='containerd filters, e.g. size==42 or labels."k"==v (any matches)')
    p.set_defaults(handler=_ls)

    p = sub.add_parser("get", help="write a blob's raw bytes to stdout")
    p.add_argument("digest", metavar="DIGEST", help="the blob's digest (sha256:...)")
    p.set_defaults(handler=_get)

    p = sub.add_parser("ingest", help="ingest stdin under REF; prints the digest")
    p.add_argument("--expected-size", type=int, default=0, metavar="N",
                   help="the exact size the content must have")
    p.add_argument("--expected-digest", default="", metavar="DIGEST",
                   help="the digest the content must have")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="label for the committed blob (repeatable)")
    p.add_argument("ref", metavar="REF",
                   help="name of the ingest: an interrupted ingest of that name resumes")
    p.set_defaults(handler=_ingest)

    p = sub.add_parser("rm", aliases=["delete"], help="remove blobs")
    p.add_argument("digests", nargs="+", metavar="DIGEST", help="blobs to remove")
    p.set_defaults(handler=_rm)

    p = sub.add_parser("label", help="set labels on a blob (an empty value deletes)")
    p.add_argument("digest", metavar="DIGEST", help="the blob to label")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE",
                   help="label to set; KEY= deletes it (none: only print the labels)")
    p.set_defaults(handler=_label)

    p = sub.add_parser("active", help="list ingests in progress")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("filters", nargs="*", metavar="FILTER",
                   help="filters on ref, expected, offset, total")
    p.set_defaults(handler=_active)

    p = sub.add_parser("abort", help="abort ingests in progress")
    p.add_argument("refs", nargs="+", metavar="REF",
                   help="ingests to abort (as 'content active' lists them)")
    p.set_defaults(handler=_abort)
