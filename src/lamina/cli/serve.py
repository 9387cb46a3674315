"""``lamina serve``: serve the root's stores over gRPC (containerd's API) on a unix socket."""

from __future__ import annotations

import argparse
import logging
import sys

from lamina.cli.app import App
from lamina.cli.common import add_examples
from lamina.errors import printable

__all__ = ["LogLines", "register"]


class LogLines(logging.Formatter):
    """``lamina serve: MESSAGE`` lines that what a message quotes (a client's key,
    an exception's text) cannot forge or drive the terminal with: a line break
    inside a record continues it, indented, and control characters are escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n    ".join(printable(line) for line in super().format(record).split("\n"))


def cmd_serve(args: argparse.Namespace, app: App) -> int:
    from lamina.api import default_address
    from lamina.api.server import Server, serve
    from lamina.metadata.recover import RecoveredRoot
    from lamina.snapshots.ahead import SERVER_STOCK
    from lamina.util.sdnotify import notify

    # A long-running server deletes removed snapshots' directories in the background,
    # and keeps new ones made ahead so that a prepare flushes only its row.
    root = RecoveredRoot(app.root, async_remove=not args.sync_remove, ahead=SERVER_STOCK)

    address = args.serve_address or app.address or default_address()
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogLines("lamina serve: %(message)s"))
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            handlers=[handler])

    def ready(server: Server) -> None:
        notify("READY=1", f"STATUS=serving {root.path} on {server.address}")  # systemd
        if not args.quiet:
            print(
                f"lamina: serving {root.path} on {server.address} "
                f"(default snapshotter {app.snapshotter})",
                file=sys.stderr,
                flush=True,
            )

    call_stats = None
    if args.call_stats:
        from lamina.api.callstats import CallStats

        call_stats = CallStats()
    mirror = None
    if args.registry_mirror:
        from lamina.api.mirror import mirror_of

        mirror = mirror_of(root.content_dir, args.registry_mirror,
                           cert=args.registry_mirror_cert, key=args.registry_mirror_key)
        mirror.start()
    try:
        serve(
            root,
            address,
            snapshotter=app.snapshotter,
            max_workers=args.workers,
            grace=args.grace,
            ready=ready,
            max_streams=args.max_streams,
            max_client_streams=args.max_client_streams,
            stream_idle_timeout=args.stream_idle_timeout,
            call_stats=call_stats,
        )
    finally:
        if mirror is not None:
            mirror.close()
        if call_stats is not None:
            call_stats.write(args.call_stats)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the root over gRPC (containerd's API)",
        description=(
            "Serve containerd's Snapshots API for the lamina root on a unix socket (mode "
            "0660), until SIGTERM or SIGINT. Requests naming a lamina snapshotter "
            "(overlay, native, erofs) use it; any other name (such as containerd's proxy plugin "
            "name) uses --snapshotter. Refuses to start while another server listens on "
            "the socket; a stale socket file is replaced. containerd uses it as a proxy "
            "plugin (see 'lamina config containerd'); lamina commands use it with --address."
        ),
    )
    p.add_argument(
        "--address",
        dest="serve_address",
        metavar="PATH",
        default=None,
        help="socket path (default: the global --address, $LAMINA_ADDRESS or "
        "/run/lamina/lamina.sock)",
    )
    p.add_argument("--workers", type=int, default=16,
                   help="worker threads for unary calls (default 16); streams have their own")
    p.add_argument("--max-streams", type=int, default=64, metavar="N",
                   help="streaming calls (Write, Read, List) open at once; more are refused "
                   "with RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--max-client-streams", type=int, default=32, metavar="N",
                   help="streaming calls open at once per client (default 32; on a unix "
                   "socket all local clients count as one)")
    p.add_argument("--stream-idle-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="close a stream whose client sent or took nothing for this long "
                   "(default 60); an interrupted write can resume")
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, how long calls in flight may take to finish (default 10)",
    )
    p.add_argument("--sync-remove", action="store_true",
                   help="delete a removed snapshot's directory before Remove returns "
                   "(default: in a background thread)")
    p.add_argument("--registry-mirror", metavar="ADDR:PORT", default="",
                   help="also serve the content store read-only over the OCI distribution "
                   "API on this TCP address (blobs and manifests by digest), for other "
                   "nodes to list as a mirror in their hosts.toml")
    p.add_argument("--registry-mirror-cert", metavar="PEM", default="",
                   help="serve the mirror over TLS with this certificate (and --registry-"
                   "mirror-key); plain HTTP without")
    p.add_argument("--registry-mirror-key", metavar="PEM", default="",
                   help="the private key of --registry-mirror-cert")
    p.add_argument("--call-stats", metavar="FILE", default="",
                   help="when the server stops, write to FILE (JSON) how many calls of each "
                   "method it answered and how long they took (median, 90th and 99th "
                   "percentile, longest, total; milliseconds)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    p.set_defaults(handler=cmd_serve)
    add_examples(
        p,
        ("serve the default root on the default socket, for containerd's proxy plugin",
         "lamina serve"),
        ("serve another root on a socket of its own, then use it from lamina",
         "lamina --root /srv/lamina serve --address /run/lamina/srv.sock &\n"
         "lamina --address /run/lamina/srv.sock snapshot ls"),
    )
