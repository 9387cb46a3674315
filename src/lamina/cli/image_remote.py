"""``lamina image pull|push|referrers``: images to and from registries."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from lamina.cli.app import App
from lamina.cli.common import (
    add_examples,
    add_max_layer_size,
    add_progress,
    add_sync,
    count,
    max_layer_size,
    sync_layers,
)
from lamina.remotes.hosts import CONTAINERD_HOSTS_DIR, LAMINA_HOSTS_DIR

# the image service and progress are imported when a verb runs (image ls registers
# these verbs too, and needs neither: bench/startup.py)
if TYPE_CHECKING:
    from lamina.images.service import ImageService
    from lamina.remotes.registry import Registry
    from lamina.util.progress import Progress

__all__ = ["add_registry_flags", "open_registry", "register"]


def add_registry_flags(v: argparse.ArgumentParser) -> None:
    v.add_argument("--plain-http", action="store_true",
                   help="talk HTTP, not HTTPS, to the registry (loopback ones are by default)")
    v.add_argument("--user", "-u", metavar="USER[:PASSWORD]",
                   help="registry credentials (asked for the password when omitted)")
    v.add_argument("--hosts-dir", action="append", metavar="DIR",
                   help=f"hosts.toml directory (default {LAMINA_HOSTS_DIR}; repeatable)")
    v.add_argument("--containerd-hosts", action="store_true",
                   help=f"also read containerd's {CONTAINERD_HOSTS_DIR}")


def open_registry(args: argparse.Namespace, domain: str = "") -> Registry:
    """The registry client the flags of :func:`add_registry_flags` describe."""
    from lamina.remotes.auth import parse_user
    from lamina.remotes.registry import Registry

    dirs = list(args.hosts_dir or [LAMINA_HOSTS_DIR])
    if args.containerd_hosts:
        dirs.append(CONTAINERD_HOSTS_DIR)
    user = None
    if args.user:
        import getpass  # when a password may be asked for (termios: start-up time)

        ask = getpass.getpass if sys.stdin.isatty() else None
        user = parse_user(args.user, ask=ask)
    return Registry(plain_http=args.plain_http, hosts_dirs=dirs, user=user, user_host=domain)


def _progress(args: argparse.Namespace) -> Progress:
    from lamina.util.progress import for_cli

    return for_cli(json_lines=args.json_progress, quiet=args.quiet, piped_lines=True)


def _images(app: App, progress: Progress, unpacking: argparse.Namespace | None = None,
            ) -> ImageService:
    """The image service; ``unpacking``: the arguments of a command that unpacks."""
    from lamina.images.service import ImageService

    if unpacking is None:
        return ImageService(app.store_root, snapshotter=app.snapshotter, progress=progress)
    return ImageService(app.store_root, snapshotter=app.snapshotter, progress=progress,
                        max_layer_size=max_layer_size(unpacking), sync=sync_layers(unpacking))


def _pull(args: argparse.Namespace, app: App) -> int:
    from lamina.oci.reference import parse_reference

    domain = parse_reference(args.ref).domain
    progress = _progress(args)
    try:
        with open_registry(args, domain) as registry:
            result = _images(app, progress, args).pull(
                registry, args.ref, platforms=args.platform or (),
                all_platforms=args.all_platforms, unpack=not args.no_unpack,
                concurrency=args.concurrency)
    finally:
        progress.close()
    if not args.json_progress:
        unpacked = f", unpacked {result.unpacked.chain_id}" if result.unpacked else ""
        print(f"{result.image.name}\t{result.image.target.digest}\t"
              f"({count(result.fetched, 'blob')} fetched, {result.present} present{unpacked})")
    return 0


def _push(args: argparse.Namespace, app: App) -> int:
    from lamina.oci.reference import parse_reference

    remote = args.remote or args.ref
    domain = parse_reference(remote).domain
    progress = _progress(args)
    try:
        with open_registry(args, domain) as registry:
            result = _images(app, progress).push(
                registry, args.ref, remote, concurrency=args.concurrency,
                referrers=not args.no_referrers)
    finally:
        progress.close()
    if not args.json_progress:
        print(f"{result.remote}\t{result.digest}\t({count(result.uploaded, 'blob')} uploaded, "
              f"{result.mounted} mounted, {result.existing} already there, "
              f"{count(result.referrers, 'referrer')})")
    return 0


def _referrers(args: argparse.Namespace, app: App) -> int:
    del app
    from lamina.cli.common import print_table
    from lamina.oci.reference import parse_reference
    from lamina.remotes.referrers import list_referrers
    from lamina.remotes.resolver import resolve

    ref = parse_reference(args.ref)
    with open_registry(args, ref.domain) as registry:
        session = registry.session(ref)
        digest = ref.digest or resolve(session, ref).desc.digest
        found, source = list_referrers(session, digest, artifact_type=args.artifact_type)
    if args.json:
        App.print_json({"subject": digest, "source": source, "referrers": found})
        return 0
    print_table(["DIGEST", "ARTIFACT TYPE", "MEDIA TYPE", "SIZE"],
                [[str(m.get("digest")), str(m.get("artifactType", "")),
                  str(m.get("mediaType", "")), str(m.get("size", ""))] for m in found])
    return 0


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = verbs.add_parser("pull", help="pull an image from a registry and unpack it")
    v.add_argument("ref", metavar="REF",
                   help="the image, as docker names it (alpine:3 is docker.io/library/alpine:3)")
    v.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]",
                   help="the platform to pull (default: this host's; repeatable)")
    v.add_argument("--all-platforms", action="store_true",
                   help="fetch the content of every platform of an index")
    v.add_argument("--no-unpack", action="store_true", help="only fetch the content")
    v.add_argument("--concurrency", type=int, default=3, metavar="N",
                   help="blobs downloaded at once (default 3)")
    add_progress(v)
    add_max_layer_size(v)
    add_sync(v)
    add_registry_flags(v)
    v.set_defaults(handler=_pull)
    add_examples(
        v,
        ("pull an image for this host's platform and unpack it",
         "lamina image pull docker.io/library/alpine:3.20"),
        ("fetch two platforms from a registry on this host, unpacking nothing",
         "lamina image pull --no-unpack --platform linux/amd64 --platform linux/arm64 \\\n"
         "    localhost:5000/app:1"),
    )

    v = verbs.add_parser("push", help="push an image (and everything it references)")
    v.add_argument("ref", metavar="REF", help="the local image")
    v.add_argument("remote", nargs="?", metavar="REMOTE",
                   help="where to push it (default: REF itself)")
    v.add_argument("--concurrency", type=int, default=3, metavar="N",
                   help="blobs uploaded at once (default 3)")
    v.add_argument("--no-referrers", action="store_true",
                   help="do not push the local artifacts whose subject is the image")
    add_progress(v)
    add_registry_flags(v)
    v.set_defaults(handler=_push)
    add_examples(
        v,
        ("push a local image under its own name",
         "lamina image push registry.example.com/team/app:1"),
        ("push it under another name, with credentials (the password is asked for)",
         "lamina image push -u ci app:1 registry.example.com/team/app:1"),
    )

    v = verbs.add_parser("referrers", help="list the OCI referrers of an image on a registry")
    v.add_argument("ref", metavar="REF", help="the image on the registry, by name or digest")
    v.add_argument("--artifact-type", default="", metavar="TYPE", help="only this artifactType")
    v.add_argument("--json", action="store_true", help="print JSON")
    add_registry_flags(v)
    v.set_defaults(handler=_referrers)
