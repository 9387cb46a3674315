"""``lamina container``: create, list, inspect, remove, upgrade, roll back, checkpoint, restore."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from lamina import rootless
from lamina.cli.app import App
from lamina.cli.common import add_examples, parse_labels, print_table, told_damaged
from lamina.containers.autoremove import remove_after_exit
from lamina.containers.network import with_network
from lamina.containers.options import make_options
from lamina.containers.runtime import (
    BindMount,
    TaskManager,
    parse_mount_flag,
    parse_volume_flag,
)
from lamina.containers.service import ContainerService
from lamina.containers.tasks import tasks_dir
from lamina.errors import InvalidArgument
from lamina.images.service import ImageService
from lamina.mounts.idmap import parse_userns
from lamina.util.progress import Progress

__all__ = [
    "add_checkpoint_flags", "add_create_flags", "add_restore_flags", "env_entries",
    "options_from_args",
    "register", "services",
]


@contextlib.contextmanager
def services(app: App) -> Iterator[ContainerService]:
    """The container service on the app's root and snapshotter."""
    if app.address:
        from lamina.errors import NotImplementedErr

        raise NotImplementedErr("container commands do not support --address")
    images = ImageService(app.store_root, snapshotter=app.snapshotter, progress=Progress())
    tasks = TaskManager(tasks_dir(app.store_root.path))  # every container command needs runc
    containers = ContainerService(app.store_root, snapshotter=app.snapshotter, images=images,
                                  tasks=tasks)
    try:
        yield containers
    finally:
        tasks.close()
        images.close()


def env_entries(args: argparse.Namespace) -> list[str]:
    """``--env-file`` lines, then ``-e`` entries; ``KEY`` alone takes this process's
    value (and is left out when it has none), as docker does."""
    entries: list[str] = []
    for path in args.env_file or []:
        with open(path, encoding="utf-8") as f:
            entries += [line.strip() for line in f
                        if line.strip() and not line.lstrip().startswith("#")]
    entries += list(args.env or [])
    out = []
    for item in entries:
        key, eq, _ = item.partition("=")
        if eq:
            out.append(item)
        elif key in os.environ:
            out.append(f"{key}={os.environ[key]}")
    return out


def _volumes(values: list[str]) -> list[BindMount]:
    """``-v`` bind mounts; a host directory that is missing is made, as docker does."""
    mounts = [parse_volume_flag(v) for v in values]
    for m in mounts:
        os.makedirs(m.source, exist_ok=True)
    return mounts


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The container options (:func:`make_options`) the flags of :func:`add_create_flags`
    and the command ask for."""
    mounts: list[BindMount] = [parse_mount_flag(m) for m in args.mount or []]
    mounts += _volumes(args.volume or [])
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    userns = parse_userns(args.userns) if getattr(args, "userns", None) else None
    options = make_options(args=cmd or None, env=env_entries(args), mounts=mounts,
                           userns=userns, cwd=args.workdir, user=args.user)
    return with_network(options, args.net)


def add_create_flags(v: argparse.ArgumentParser) -> None:
    """The flags that choose a new container's options (``run`` and ``container create``)."""
    v.add_argument("-l", "--label", action="append", metavar="K=V", help="container label")
    v.add_argument("--mount", action="append", metavar="SPEC",
                   help="bind mount: type=bind,src=/host,dst=/ctr[,ro]")
    v.add_argument("-v", "--volume", action="append", metavar="/HOST:/CTR[:ro]",
                   help="bind mount the host path /HOST at /CTR (docker's form; read-only "
                   "with :ro); a missing host directory is created")
    v.add_argument("-e", "--env", action="append", metavar="K=V",
                   help="environment variable; K alone passes on this shell's value of K")
    v.add_argument("--env-file", action="append", metavar="FILE",
                   help="read environment variables from FILE, one K=V (or K) a line; "
                   "# starts a comment")
    v.add_argument("-w", "--workdir", "--cwd", metavar="DIR",
                   help="working directory inside the container (replaces the image's)")
    v.add_argument("-u", "--user", metavar="UID[:GID]",
                   help="user (and group) the command runs as, numeric or a name from the "
                   "image's /etc/passwd (replaces the image's)")
    v.add_argument("--userns", metavar="HOSTID:SIZE",
                   help="own user namespace: container IDs 0..SIZE-1 are host HOSTID.. "
                   "(HOSTUID:HOSTGID:SIZE for different uid and gid bases); the image "
                   "is mounted ID-mapped, never chowned")
    v.add_argument("--net", "--network", dest="net", choices=("none", "host", "bridge"),
                   default=None,
                   help="the container's network: none (its own, loopback only; the "
                   "default), host (the host's), bridge (an address on the lamina0 "
                   "bridge, 10.88.0.0/16, through the CNI plugins; root only)")


def _create(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        c = ct.create(args.image, args.id, labels=parse_labels(args.label),
                                 options=options_from_args(args))
    print(c.id)
    return 0


def _record(ct: ContainerService, cid: str) -> dict[str, Any]:
    c = ct.get(cid)
    task = ct.task(cid)
    return {
        "id": c.id,
        "image": c.image,
        "snapshotter": c.snapshotter,
        "snapshot_key": c.snapshot_key,
        "labels": dict(c.labels),
        "options": ct.options(c),
        "spec": c.spec,
        "created": c.created,
        "updated": c.updated,
        "task": None if task is None else {
            "status": str(task.status), "pid": task.pid, "exit_code": task.exit_code,
            "detached": task.detached, "bundle": str(task.bundle),
        },
    }


def _ls(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        found, damaged = ct.readable()  # a damaged one is told after the others
        records = [_record(ct, c.id) for c in found]
    if args.running:
        records = [r for r in records
                   if r["task"] and r["task"]["status"] in ("running", "paused")]
    if args.json:
        app.print_json(records)
        return told_damaged(damaged)
    if args.quiet:
        for r in records:
            print(r["id"])
        return told_damaged(damaged)
    print_table(("CONTAINER", "IMAGE", "TASK", "REVISION"),
                ([r["id"], r["image"], r["task"]["status"] if r["task"] else "-",
                  r["snapshot_key"]] for r in records),
                widths=(24, 48, 8))
    return told_damaged(damaged)


def _info(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        app.print_json(_record(ct, args.id))
    return 0


def _rm(args: argparse.Namespace, app: App) -> int:
    if args.after_exit:
        return _rm_after_exit(args, app)
    with services(app) as ct:
        for cid in args.ids:
            ct.require(cid)
        for i, cid in enumerate(args.ids, 1):
            ct.remove(cid, force=args.force, sync=i == len(args.ids))
            print(cid)
    return 0


def _rm_after_exit(args: argparse.Namespace, app: App) -> int:
    if len(args.ids) != 1:
        raise InvalidArgument("--after-exit takes one container ID")
    cid = args.ids[0]
    tasks = TaskManager(tasks_dir(app.root))
    try:
        if remove_after_exit(tasks, cid, lambda: services(app)):
            print(cid)
    finally:
        tasks.close()
    return 0


def _upgrade(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        ct.get(args.id)
        ct.images.get(args.image)
        with ct.stopped(args.id, timeout=args.timeout):
            c = ct.upgrade(args.id, args.image)
    print(f"{c.id}\t{c.image}\t{c.snapshot_key}")
    return 0


def _rollback(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        ct.get(args.id)
        with ct.stopped(args.id, timeout=args.timeout):
            c = ct.rollback(args.id)
    print(f"{c.id}\t{c.image}\t{c.snapshot_key}")
    return 0


def _revisions(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        revs = ct.revisions(args.id)
    if args.json:
        app.print_json([{"key": r.key, "image": r.image, "previous": r.previous,
                         "created": r.created, "current": r.current} for r in revs])
        return 0
    print(f"{'':<2}{'REVISION':<72} {'IMAGE':<40} CREATED")
    for r in revs:
        created = r.created.isoformat() if r.created else "-"
        print(f"{'*' if r.current else ' ':<2}{r.key:<72} {r.image:<40} {created}")
    return 0


def _prune(args: argparse.Namespace, app: App) -> int:
    if args.keep < 0:
        raise InvalidArgument("--keep must be >= 0")
    with services(app) as ct:
        removed = ct.prune_revisions(args.id, keep=args.keep)
    for key in removed:
        print(key)
    return 0


def _checkpoint(args: argparse.Namespace, app: App) -> int:
    rootless.refuse("container checkpoint", rootless.CRIU_ROOTLESS)
    with services(app) as ct:
        result = ct.checkpoint(args.id, args.ref, exit=args.exit, binds=args.binds)
    print(result.index.digest)
    print(f"checkpoint image: {result.ref}", file=sys.stderr)
    if args.verbose:
        print(json.dumps(dict(result.timings), sort_keys=True), file=sys.stderr)
    return 0


def _restore(args: argparse.Namespace, app: App) -> int:
    rootless.refuse("container restore", rootless.CRIU_ROOTLESS)
    with services(app) as ct:
        result = ct.restore(args.ref, args.id, bind_root=args.bind_root, binds=args.binds)
    print(f"{result.container.id}\t{result.task.pid}")
    if args.verbose:
        print(json.dumps(dict(result.timings), sort_keys=True), file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("container", aliases=["containers", "c"], help="manage containers")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    v = verbs.add_parser("create", help="create a container on an image",
                         description="Create container ID on IMAGE, in ctr's form (IMAGE ID "
                         "[CMD...]; lamina run takes docker's); task start runs it.")
    add_create_flags(v)
    v.add_argument("image", metavar="IMAGE", help="the image the container runs")
    v.add_argument("id", metavar="ID", help="the new container's ID")
    v.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD",
                   help="command (replaces the image's Cmd)")
    add_examples(
        v,
        ("create, then start in the foreground (ctr's form: IMAGE, then ID)",
         "lamina container create -e A=1 alpine:3 demo sh -c 'echo $A'\n"
         "lamina task start demo"),
    )
    v.set_defaults(handler=_create)

    v = verbs.add_parser("ls", aliases=["list"], help="list containers")
    v.add_argument("--json", action="store_true", help="print the records as JSON")
    v.add_argument("-q", "--quiet", action="store_true", help="ids only")
    v.add_argument("--running", action="store_true",
                   help="only containers whose task runs or is paused (what lamina ps lists; "
                   "lamina ps -a lists all)")
    v.set_defaults(handler=_ls)

    v = verbs.add_parser("info", help="a container's record as JSON")
    v.add_argument("id", metavar="ID", help="the container")
    v.set_defaults(handler=_info)

    v = verbs.add_parser("rm", aliases=["remove", "delete"],
                         help="remove containers and their revisions",
                         description="Remove containers (their revisions too), then "
                         "collect garbage.")
    v.add_argument("ids", nargs="+", metavar="ID", help="the containers to remove")
    v.add_argument("-f", "--force", action="store_true", help="kill a running task first")
    v.add_argument("--after-exit", action="store_true",
                   help="wait until the container's detached task ends, then remove it "
                   "(what run -d --rm starts in the background); a task lamina stops to "
                   "upgrade, roll back or checkpoint the container does not count")
    v.set_defaults(handler=_rm)

    v = verbs.add_parser("upgrade", help="move a container to another image, keeping its writes")
    v.add_argument("id", metavar="ID", help="the container")
    v.add_argument("image", metavar="NEW_IMAGE", help="the image to move it to")
    v.add_argument("-t", "--timeout", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping a running task")
    v.set_defaults(handler=_upgrade)

    v = verbs.add_parser("rollback", help="go back to the previous revision")
    v.add_argument("id", metavar="ID", help="the container")
    v.add_argument("-t", "--timeout", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping a running task")
    v.set_defaults(handler=_rollback)

    v = verbs.add_parser("revisions", help="list a container's revisions (oldest first)")
    v.add_argument("id", metavar="ID", help="the container")
    v.add_argument("--json", action="store_true", help="print the revisions as JSON")
    v.set_defaults(handler=_revisions)

    v = verbs.add_parser("prune-revisions", help="remove all but the newest revisions")
    v.add_argument("id", metavar="ID", help="the container")
    v.add_argument("--keep", type=int, required=True, metavar="N",
                   help="how many of the newest revisions to keep")
    v.set_defaults(handler=_prune)

    v = verbs.add_parser("checkpoint", help="checkpoint a running container into an image")
    add_checkpoint_flags(v)

    v = verbs.add_parser("restore", help="restore a checkpoint as a new running container")
    add_restore_flags(v)


def add_checkpoint_flags(v: argparse.ArgumentParser) -> None:
    v.add_argument("--exit", action="store_true", help="stop the task after the checkpoint")
    v.add_argument("--binds", action="store_true", help="archive bind mount contents too")
    v.add_argument("-v", "--verbose", action="store_true", help="print timings (stderr)")
    v.add_argument("id", metavar="ID", help="the container whose task to checkpoint")
    v.add_argument("ref", nargs="?", metavar="REF",
                   help="image name (default checkpoint/<id>:<timestamp>)")
    v.set_defaults(handler=_checkpoint)


def add_restore_flags(v: argparse.ArgumentParser) -> None:
    where = v.add_mutually_exclusive_group()
    where.add_argument("--binds", action="store_true",
                       help="write the bind mount contents the checkpoint carries back to "
                            "the host paths it records")
    where.add_argument("--bind-root", metavar="DIR",
                       help="write them under DIR/<destination> instead (and mount them "
                            "from there)")
    v.add_argument("-v", "--verbose", action="store_true", help="print timings (stderr)")
    v.add_argument("ref", metavar="REF", help="the checkpoint image")
    v.add_argument("id", metavar="ID", help="the new container's ID")
    v.set_defaults(handler=_restore)
