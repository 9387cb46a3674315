"""``lamina image``: import, list, unpack, mount, tag, export and remove images."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from lamina.cli.app import App
from lamina.cli.common import (
    add_examples,
    add_max_layer_size,
    add_mount_flags,
    add_progress,
    add_sync,
    count,
    human_age,
    human_size,
    max_layer_size,
    print_table,
    sync_layers,
    terminal_columns,
    told_damaged,
)
from lamina.errors import InvalidArgument
from lamina.images.catalog import Catalog
from lamina.metadata.root import check_snapshotter

# image ls, the command run most, imports what the other verbs need when they run
if TYPE_CHECKING:
    from lamina.images.service import ImageService

__all__ = ["register"]


@contextlib.contextmanager
def _service(args: argparse.Namespace, app: App, *,
             piped_lines: bool = False) -> Iterator[ImageService]:
    """The image service, its progress as the arguments ask; ``piped_lines``: plain progress
    lines when output is piped (unpack leaves them off: scripts read its one line)."""
    from lamina.images.service import ImageService
    from lamina.util.progress import for_cli

    progress = for_cli(json_lines=getattr(args, "json_progress", False),
                       quiet=getattr(args, "quiet", False), piped_lines=piped_lines)
    svc = ImageService(app.store_root, snapshotter=app.snapshotter,
                       snapshots=app.snapshots(), progress=progress,
                       max_layer_size=max_layer_size(args), sync=sync_layers(args))
    try:
        yield svc
    finally:
        progress.close()
        svc.close()


def _import(args: argparse.Namespace, app: App) -> int:
    with _service(args, app, piped_lines=True) as svc:
        images = svc.import_(args.file, unpack=not args.no_unpack, index_name=args.index_name)
    for image in images:
        print(f"{image.name}\t{image.target.digest}")
    return 0


def _catalog(app: App) -> Catalog:
    """The images of the root, or (with --address) of the server, as ls and inspect
    read them: resolved and measured on this side, so both read alike. The content
    store and the snapshotter are opened for the first image (an empty root's
    ls opens neither); a local root's snapshotter name is checked all the same."""
    if app.address is None:
        check_snapshotter(app.snapshotter)
    return Catalog(app.images(), content=app.content, snapshots=app.snapshots)


def _ls(args: argparse.Namespace, app: App) -> int:
    catalog = _catalog(app)
    # a damaged record is told after the listing of the others, and ends it with its code
    images, damaged = catalog.listing(args.filter or ())
    if args.json:
        app.print_json([{"name": i.name, "target": i.target.to_json(), "labels": i.labels,
                         "created": i.created, "updated": i.updated} for i in images])
        return told_damaged(damaged)
    if args.quiet:
        for i in images:
            print(i.name if args.names else _short_id(i.target.digest, args.no_trunc))
        return told_damaged(damaged)
    summaries = catalog.summarize(images)
    names = ["NAME"] if args.names else ["REPOSITORY", "TAG"]
    header = [*names, "IMAGE ID", "CREATED", "PLATFORM", "SIZE"]
    if args.digests:
        header.insert(len(names), "DIGEST")
    rows = []
    for s in summaries:
        row = [s.image.name] if args.names else [s.repository, s.tag or "<none>"]
        if args.digests:
            row.append(s.image.target.digest)
        row += [_short_id(s.id, args.no_trunc), human_age(s.image.created),
                s.platform or "-", "-" if s.size is None else human_size(s.size)]
        rows.append(row)
    print_table(header, rows, fit=None if args.no_trunc else terminal_columns(),
                shrink=range(len(names)))
    return told_damaged(damaged)


def _short_id(digest: str, no_trunc: bool) -> str:
    return digest if no_trunc else digest.partition(":")[2][:12]


def _inspect(args: argparse.Namespace, app: App) -> int:
    from lamina.images.summary import docker_view

    catalog = _catalog(app)
    if args.mode == "native":
        app.print_json([catalog.native(ref) for ref in args.refs])
    else:
        app.print_json([docker_view(catalog.summary(ref)) for ref in args.refs])
    return 0


def _rm(args: argparse.Namespace, app: App) -> int:
    for i, name in enumerate(args.names, 1):
        app.delete_image(name, sync=args.sync and i == len(args.names))
        print(name)
    return 0


def _unpack(args: argparse.Namespace, app: App) -> int:
    with _service(args, app) as svc:
        result = svc.unpack(args.ref)
    print(f"{args.ref}: {result.chain_id} ({count(result.extracted, 'layer')} extracted, "
          f"{result.reused} reused)")
    return 0


def _mount(args: argparse.Namespace, app: App) -> int:
    with _service(args, app) as svc:
        svc.mount(args.ref, args.target, rw=args.rw, allow_suid=args.allow_suid,
                  allow_dev=args.allow_dev)
    print(args.target)
    return 0


def _unmount(args: argparse.Namespace, app: App) -> int:
    with _service(args, app) as svc:
        svc.unmount(args.target, keep_snapshot=args.keep)
    return 0


def _tag(args: argparse.Namespace, app: App) -> int:
    from lamina.images.names import add_name

    image = add_name(app.images(), args.source, args.target)
    print(f"{image.name}\t{image.target.digest}")
    return 0


def _export(args: argparse.Namespace, app: App) -> int:
    if args.file != "-":
        with _service(args, app) as svc:
            svc.export(args.refs, args.file)
        return 0
    # `-` is standard output, as for ctr and tar: the tar alone goes there (no
    # progress), and a terminal is refused rather than filled with binary.
    if sys.stdout.isatty():
        raise InvalidArgument("refusing to write an image tar to a terminal: "
                              "redirect standard output, or name a file")
    args.quiet = True
    with _service(args, app) as svc:
        sys.stdout.flush()
        svc.export(args.refs, sys.stdout.buffer)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("image", aliases=["images", "i"], help="manage images")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    v = verbs.add_parser("import", help="import an OCI layout (dir or tar) or docker save tar")
    v.add_argument("file", metavar="FILE",
                   help="an OCI image layout (a directory or a tar), or a docker save tar")
    v.add_argument("--no-unpack", action="store_true", help="do not unpack into snapshots")
    v.add_argument("--index-name", metavar="NAME",
                   help="also name the whole index as this image")
    add_progress(v)
    add_max_layer_size(v)
    add_sync(v)
    add_examples(
        v,
        ("import what docker save wrote, and unpack it for this host",
         "docker save -o alpine.tar alpine:3\nlamina image import alpine.tar"),
        ("import an OCI layout directory (skopeo's oci:DIR) without unpacking it",
         "lamina image import --no-unpack ./alpine-oci"),
    )
    v.set_defaults(handler=_import)

    v = verbs.add_parser(
        "ls", aliases=["list"], help="list images",
        description="List images as nerdctl images does. IMAGE ID is the first 12 hex "
        "digits of the digest the name points to (an index or a manifest); CREATED is when "
        "the image was recorded here; PLATFORM and SIZE are those of the host's manifest "
        "(else the first stored one). SIZE is the disk use of the unpacked layers when every "
        "layer is unpacked in the chosen snapshotter, else the sum of the layer blobs' "
        "(compressed) sizes. On a terminal, long names are shortened with an ellipsis to "
        "fit its width.")
    v.add_argument("--json", action="store_true",
                   help="the image records as JSON (name, target, labels, times)")
    v.add_argument("--quiet", "-q", action="store_true",
                   help="only the image IDs, one a line, as nerdctl prints them "
                   "(with --names: the names)")
    v.add_argument("--names", action="store_true",
                   help="one NAME column with the full name instead of REPOSITORY and TAG")
    v.add_argument("--digests", action="store_true",
                   help="add a DIGEST column: the full digest the name points to")
    v.add_argument("--no-trunc", action="store_true",
                   help="full digests as IDs, and no name shortened to fit the terminal")
    v.add_argument("--filter", "-f", action="append", metavar="KEY=VALUE",
                   help="only the images that match (repeatable): reference=PATTERN "
                   "(a glob on the name), before=REF, since=REF, label=KEY[=VALUE], "
                   "dangling=true|false (only a digest names it)")
    add_examples(
        v,
        ("the images, as nerdctl images shows them", "lamina image ls"),
        ("every tag of a repository, with the digests the names point to",
         "lamina image ls --digests -f reference=docker.io/library/alpine"),
        ("remove the images recorded before app:2",
         "lamina image rm $(lamina image ls -q --names -f before=app:2)"))
    v.set_defaults(handler=_ls)

    v = verbs.add_parser(
        "inspect", help="show images' configs and details as JSON",
        description="Print a JSON array with one object per image, with the fields of "
        "nerdctl image inspect: Id (the digest the name points to, the IMAGE ID of image "
        "ls), RepoTags, RepoDigests, Created, Architecture, Os, Variant, Size (as image ls "
        "measures it), RootFS (the layers' DiffIDs) and Config (the image config's).")
    v.add_argument("refs", nargs="+", metavar="REF", help="image names")
    v.add_argument("--mode", choices=("dockercompat", "native"), default="dockercompat",
                   help="dockercompat (default): docker's fields; native: lamina's record "
                   "with the index, manifest and config documents as stored")
    add_examples(
        v,
        ("the command an image runs", "lamina image inspect app:1 | jq '.[0].Config.Cmd'"),
        ("the stored index, manifest and config", "lamina image inspect --mode native app:1"))
    v.set_defaults(handler=_inspect)

    v = verbs.add_parser("rm", aliases=["remove"], help="remove images")
    v.add_argument("names", nargs="+", metavar="REF", help="images to remove")
    v.add_argument("--sync", action="store_true", help="garbage-collect before returning")
    v.set_defaults(handler=_rm)

    v = verbs.add_parser("unpack", help="unpack an image into snapshots")
    v.add_argument("ref", metavar="REF", help="the image to unpack")
    add_progress(v, quiet=False)
    add_max_layer_size(v)
    add_sync(v)
    v.set_defaults(handler=_unpack)

    v = verbs.add_parser("mount", help="mount an image's filesystem on a directory")
    v.add_argument("ref", metavar="REF", help="the image to mount")
    v.add_argument("target", metavar="TARGET", help="directory to mount it on")
    v.add_argument("--rw", action="store_true", help="writable (changes are dropped on unmount)")
    add_mount_flags(v)
    v.set_defaults(handler=_mount)

    v = verbs.add_parser("unmount", help="unmount what 'image mount' mounted")
    v.add_argument("target", metavar="TARGET", help="the directory 'image mount' was given")
    v.add_argument("--keep", action="store_true", help="keep the snapshot")
    v.set_defaults(handler=_unmount)

    v = verbs.add_parser("export", help="export images as an OCI layout tar")
    v.add_argument("file", metavar="FILE", help="where the tar goes (- for standard output)")
    v.add_argument("refs", nargs="+", metavar="REF", help="images to export")
    v.set_defaults(handler=_export)

    from lamina.cli import image_remote

    image_remote.register(verbs)

    v = verbs.add_parser("tag", help="name a local image anew (SRC stays)")
    v.add_argument("source", metavar="SRC", help="a local image")
    v.add_argument("target", metavar="DST", help="its new name")
    v.set_defaults(handler=_tag)
