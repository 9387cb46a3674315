"""``lamina snapshot``: manage snapshots, like ``ctr snapshots``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from lamina.cli.app import App
from lamina.cli.common import (
    add_examples,
    add_mount_flags,
    human_size,
    parse_labels,
    print_table,
)
from lamina.errors import printable
from lamina.mounts.mount import Mount, mount_all, unmount_all
from lamina.owners import short
from lamina.snapshots import Info, Kind, Snapshotter, Usage

__all__ = ["info_json", "register"]


# -- formatting ---------------------------------------------------------------


def info_json(info: Info) -> dict[str, Any]:
    """An :class:`Info` as a JSON-able dict (times in ISO 8601)."""
    return {
        "name": info.name,
        "parent": info.parent,
        "kind": info.kind.value,
        "labels": dict(sorted(info.labels.items())),
        "created": info.created.isoformat() if info.created else None,
        "updated": info.updated.isoformat() if info.updated else None,
    }


def _mount_json(m: Mount) -> dict[str, Any]:
    return {"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)}


def _print_mounts(mounts: Sequence[Mount], target: str) -> None:
    for m in mounts:
        dest = os.path.join(target, m.target.lstrip("/")) if m.target else target
        print(m.command_line(dest))


# -- handlers -----------------------------------------------------------------


def _create(args: argparse.Namespace, app: App, kind: Kind) -> int:
    sn = app.snapshots()
    labels = parse_labels(args.label)
    make = sn.prepare if kind is Kind.ACTIVE else sn.view
    mounts = make(args.key, args.parent, labels=labels or None)
    if args.mounts:
        app.print_json([_mount_json(m) for m in mounts])
    elif args.target:
        _print_mounts(mounts, args.target)
    return 0


def cmd_prepare(args: argparse.Namespace, app: App) -> int:
    return _create(args, app, Kind.ACTIVE)


def cmd_view(args: argparse.Namespace, app: App) -> int:
    return _create(args, app, Kind.VIEW)


def cmd_mounts(args: argparse.Namespace, app: App) -> int:
    mounts = app.snapshots().mounts(args.key)
    if args.json:
        app.print_json([_mount_json(m) for m in mounts])
    else:
        _print_mounts(mounts, args.target)
    return 0


def cmd_mount(args: argparse.Namespace, app: App) -> int:
    mounts = app.snapshots().mounts(args.key)
    mount_all(mounts, args.target, allow_suid=args.allow_suid, allow_dev=args.allow_dev)
    return 0


def cmd_unmount(args: argparse.Namespace, app: App) -> int:
    unmount_all(args.target)
    return 0


def cmd_commit(args: argparse.Namespace, app: App) -> int:
    labels = parse_labels(args.label)
    app.snapshots().commit(args.name, args.key, labels=labels or None)
    return 0


def cmd_rm(args: argparse.Namespace, app: App) -> int:
    sn = app.snapshots()
    for key in args.keys:
        sn.remove(key)
    return 0


def _owners(sn: Snapshotter) -> dict[str, str] | None:
    """Owner of each snapshot, by key (lamina.owners); None where unknown (--address)."""
    owners = getattr(sn, "owners", None)
    return owners() if callable(owners) else None


def _with_owner(info: Info, owners: dict[str, str] | None) -> dict[str, Any]:
    out = info_json(info)
    if owners is not None and info.name in owners:
        out["owner"] = short(owners[info.name], info.name)
    return out


def cmd_ls(args: argparse.Namespace, app: App) -> int:
    sn = app.snapshots()
    infos = sorted(sn.walk(*args.filters), key=lambda i: i.name)
    owners = _owners(sn)
    if args.json:
        app.print_json([_with_owner(i, owners) for i in infos])
    elif args.quiet:
        for i in infos:
            print(printable(i.name))
    elif owners is None:
        print_table(["KEY", "PARENT", "KIND"], ([i.name, i.parent, i.kind.value] for i in infos))
    else:
        print_table(["KEY", "PARENT", "KIND", "OWNER"],
                    ([i.name, i.parent, i.kind.value, short(owners.get(i.name, ""), i.name)]
                     for i in infos))
    return 0


def cmd_info(args: argparse.Namespace, app: App) -> int:
    sn = app.snapshots()
    app.print_json(_with_owner(sn.stat(args.key), _owners(sn)))
    return 0


def cmd_usage(args: argparse.Namespace, app: App) -> int:
    sn = app.snapshots()
    keys = args.keys or sorted(i.name for i in sn.walk())
    usages: list[tuple[str, Usage]] = [(k, sn.usage(k)) for k in keys]
    if args.json:
        app.print_json([{"key": k, "size": u.size, "inodes": u.inodes} for k, u in usages])
        return 0
    size = str if args.bytes else human_size
    print_table(["KEY", "SIZE", "INODES"], ([k, size(u.size), str(u.inodes)] for k, u in usages))
    return 0


def cmd_label(args: argparse.Namespace, app: App) -> int:
    sn = app.snapshots()
    changes = parse_labels(args.labels, allow_bare=True)
    info = sn.stat(args.key)
    if changes:
        info = sn.update(
            Info(kind=info.kind, name=info.name, parent=info.parent, labels=changes),
            *(f"labels.{k}" for k in changes),
        )
    if args.json:
        app.print_json(dict(sorted(info.labels.items())))
    else:
        for k, v in sorted(info.labels.items()):
            print(printable(f"{k}={v}"))
    return 0


def tree_lines(infos: Iterable[Info]) -> list[str]:
    """Parent chains drawn as a tree: roots first, each child indented under its parent."""
    by_name = {i.name: i for i in infos}
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for info in by_name.values():
        if info.parent and info.parent in by_name:
            children.setdefault(info.parent, []).append(info.name)
        else:
            roots.append(info.name)
    lines: list[str] = []

    def draw(name: str, depth: int) -> None:
        kind = by_name[name].kind.value
        suffix = "" if kind == Kind.COMMITTED.value else f" ({kind})"
        prefix = "" if depth == 0 else "  " * (depth - 1) + " \\_ "
        lines.append(f"{prefix}{name}{suffix}")
        for child in sorted(children.get(name, [])):
            draw(child, depth + 1)

    for root in sorted(roots):
        draw(root, 0)
    return lines


def cmd_tree(args: argparse.Namespace, app: App) -> int:
    for line in tree_lines(app.snapshots().walk()):
        print(printable(line))
    return 0


def cmd_cleanup(args: argparse.Namespace, app: App) -> int:
    app.snapshots().cleanup()
    return 0


# -- parser -------------------------------------------------------------------


def cmd_diff(args: argparse.Namespace, app: App) -> int:
    from lamina.archive.compression import compression_from_media_type
    from lamina.differ import create_diff

    comp = compression_from_media_type(args.media_type).value
    content = app.content()
    outcome = create_diff(app.snapshots(), content, args.key, args.parent,
                          compression=comp, tmpmounts=app.tmpmounts)
    desc = outcome.descriptor
    if sys.stdout.isatty() or args.print_descriptor:
        app.print_json({**desc.to_json(), "diffID": outcome.diff_id})
    else:  # like ctr: the layer itself on stdout
        with content.reader(desc.digest) as r:
            shutil.copyfileobj(r, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
    if not args.keep:
        content.delete(desc.digest)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser(
        "snapshot", aliases=["snapshots"], help="manage snapshots",
        description="Manage snapshots of the chosen snapshotter (--snapshotter).",
    )
    sub = group.add_subparsers(dest="snapshot_command", metavar="VERB", required=True)

    def verb(name: str, handler: Any, help: str, aliases: Sequence[str] = (),
             description: str | None = None) -> Any:
        p = sub.add_parser(name, help=help, description=description, aliases=list(aliases))
        p.set_defaults(handler=handler)
        return p

    for name, handler, what, key, parent in (
        ("prepare", cmd_prepare, "create an active (writable) snapshot KEY on PARENT",
         "name of the new active snapshot",
         "committed snapshot to build on (default: none, an empty snapshot)"),
        ("view", cmd_view, "create a read-only view KEY of PARENT",
         "name of the new view", "committed snapshot to view"),
    ):
        p = verb(name, handler, what)
        p.add_argument("--label", action="append", default=[], metavar="K=V",
                       help="label to set (repeatable)")
        p.add_argument("--target", default="", metavar="DIR",
                       help="print the mount command lines for this directory")
        p.add_argument("--mounts", action="store_true", help="print the mounts as JSON")
        p.add_argument("key", metavar="KEY", help=key)
        p.add_argument("parent", metavar="PARENT", nargs="?", default="", help=parent)
        if name == "prepare":
            add_examples(
                p,
                ("a writable snapshot on nothing, mounted on /mnt by hand",
                 "lamina snapshot prepare --target /mnt work | sh"),
                ("a writable layer on top of the committed snapshot base",
                 "lamina snapshot prepare work2 base"),
            )

    p = verb("diff", cmd_diff, "write the layer of changes from PARENT to KEY",
             description="Write the layer of changes from PARENT (default: KEY's parent) to "
             "KEY to standard output; on a terminal, or with --print-descriptor, print its "
             "descriptor and DiffID instead.")
    p.add_argument("--media-type", default="application/vnd.oci.image.layer.v1.tar+gzip",
                   metavar="TYPE",
                   help="layer media type: ...tar, ...tar+gzip (default) or ...tar+zstd")
    p.add_argument("--keep", action="store_true", help="keep the layer in the content store")
    p.add_argument("--print-descriptor", action="store_true",
                   help="print the layer's descriptor instead of its bytes")
    p.add_argument("key", metavar="KEY", help="snapshot whose changes the layer holds")
    p.add_argument("parent", metavar="PARENT", nargs="?", default=None,
                   help="snapshot to compare with (default: KEY's parent)")

    p = verb("mounts", cmd_mounts, "print the mount commands of KEY for TARGET",
             aliases=["m", "mount-command"])
    p.add_argument("--json", action="store_true", help="print the mounts as JSON")
    p.add_argument("target", metavar="TARGET", help="directory the commands mount on")
    p.add_argument("key", metavar="KEY", help="snapshot to mount")

    p = verb("mount", cmd_mount, "mount snapshot KEY on TARGET",
             description="Mount snapshot KEY on directory TARGET, nosuid and nodev unless "
             "--allow-suid or --allow-dev say otherwise.")
    add_mount_flags(p)
    p.add_argument("target", metavar="TARGET", help="directory to mount on")
    p.add_argument("key", metavar="KEY", help="snapshot to mount")

    p = verb("unmount", cmd_unmount, "unmount everything on TARGET", aliases=["umount"])
    p.add_argument("target", metavar="TARGET", help="directory to unmount")

    p = verb("commit", cmd_commit, "commit active snapshot KEY as NAME")
    p.add_argument("--label", action="append", default=[], metavar="K=V",
                   help="label to set on the committed snapshot (repeatable)")
    p.add_argument("name", metavar="NAME", help="name of the committed snapshot")
    p.add_argument("key", metavar="KEY", help="active snapshot to commit (it is gone after)")
    add_examples(
        p,
        ("commit the active snapshot work as base, then build on it",
         "lamina snapshot commit base work\nlamina snapshot prepare work2 base"),
    )

    p = verb("rm", cmd_rm, "remove snapshots", aliases=["remove", "delete", "del"])
    p.add_argument("keys", nargs="+", metavar="KEY",
                   help="snapshots to remove, in this order (a parent after its children)")

    p = verb("ls", cmd_ls, "list snapshots and their owners", aliases=["list"],
             description="List snapshots, with their owner: lamina, or containerd:NAMESPACE "
             "for what containerd made through lamina serve (read-only here).")
    p.add_argument("--json", action="store_true", help="print infos as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print keys only")
    p.add_argument("filters", nargs="*", metavar="FILTER",
                   help="containerd filters, e.g. kind==committed or labels.\"k\"==v "
                   "(any matches)")

    p = verb("info", cmd_info, "print the info of KEY as JSON")
    p.add_argument("key", metavar="KEY", help="snapshot to describe")

    p = verb("usage", cmd_usage, "disk use of snapshots (all when no KEY)", aliases=["du"])
    p.add_argument("-b", "--bytes", action="store_true", help="sizes in bytes")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("keys", nargs="*", metavar="KEY", help="snapshots to measure (default: all)")

    p = verb("label", cmd_label, "set labels of KEY; prints its labels")
    p.add_argument("--json", action="store_true", help="print the labels as JSON")
    p.add_argument("key", metavar="KEY", help="snapshot to label")
    p.add_argument("labels", nargs="*", metavar="K=V",
                   help="label to set; K= deletes K (none: only print the labels)")

    verb("tree", cmd_tree, "draw parent chains as a tree")
    verb("cleanup", cmd_cleanup, "remove on-disk state the metadata does not know")
