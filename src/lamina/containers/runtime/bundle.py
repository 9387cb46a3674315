"""Bundles: the on-disk state of tasks, and the words used to describe them.

A :class:`Bundles` owns one state directory::

    <state_dir>/runc/            runc's own state (``runc --root``), nobody else's
    <state_dir>/<id>/            the task's OCI bundle
        config.json              the runtime spec
        rootfs/                  the snapshot's mounts, mounted before runc starts
        meta.json                what lamina needs to know later (mounts, mode, times)
        runc.pid                 the container init's host pid (runc --pid-file)
        runc.log                 runc's own log (JSON lines)
        output.log               stdout + stderr of a detached task (unless meta.json
                                 names another ``output``), rotated at OUTPUT_MAX
        exit.json                exit code, once runc has reported it
        shim.json, shim.pid      the monitor of a detached task (see ``shim.py``)
    <state_dir>/.locks/<id>.lock serialises start/restore/delete of one id

Everything a later, unrelated lamina process needs is in those files and in
runc's state, so tasks started by one process are listed, signalled, paused,
checkpointed and deleted by another.

A bundle exists once its ``meta.json`` does: :meth:`Bundles.create` mounts the
rootfs and writes the spec first and ``meta.json`` last, and removes what it
made if anything fails, so a directory without ``meta.json`` is a start that
died half-way and may be removed. Directories are owner-only (0700), files
0600; the rootfs is mounted exactly as the snapshotter says (setuid binaries
and devices of the image work inside the container), as containerd's shim does.

This module only lays out and changes files; running runc in a bundle is
:mod:`.launch`'s, and :mod:`.tasks` and :mod:`.criu` use both.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina import rootless
from lamina.errors import AlreadyExists, Internal, InvalidArgument, NotFound
from lamina.fs.files import atomic_write, locked, remove_tree
from lamina.mounts.idmap import reachable_from_userns
from lamina.mounts.mount import Mount, is_mountpoint, mount_all, unmount_all

__all__ = [
    "OUTPUT_MAX",
    "Bundles",
    "TaskInfo",
    "TaskStatus",
    "is_task_id",
    "mount_from_json",
    "mount_rootfs",
    "mount_to_json",
    "output_log",
    "read_json",
    "read_pid",
    "validate_id",
    "write_json",
]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_RESERVED = {"runc"}

OUTPUT_MAX = 5 << 20
"""Bytes a detached task's output log grows to before the shim rotates it: one rotated
file is kept, so a task's output takes at most twice this."""


class TaskStatus(enum.StrEnum):
    """runc's container states."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class TaskInfo:
    """What is known about one task."""

    id: str
    status: TaskStatus
    pid: int | None
    exit_code: int | None
    bundle: Path
    detached: bool
    created: float | None = None
    output: Path | None = None

    @property
    def output_path(self) -> Path:
        """Where a detached task's stdout and stderr go."""
        return self.output or self.bundle / "output.log"


def is_task_id(name: str) -> bool:
    """Whether ``name`` is usable as a task id (and so may name a bundle)."""
    return isinstance(name, str) and bool(_ID_RE.match(name)) and name not in _RESERVED


def validate_id(task_id: str) -> str:
    """``task_id`` if it is usable as a runc id and a directory name."""
    if not is_task_id(task_id):
        raise InvalidArgument(
            f"invalid task id {task_id!r}: use 1-128 of [A-Za-z0-9_.+-], "
            "starting with a letter or digit (not 'runc')"
        )
    return task_id


# -- the files of a bundle ---------------------------------------------------------


def mount_to_json(m: Mount) -> dict[str, Any]:
    """``m`` as recorded in ``meta.json`` (and a checkpoint's metadata)."""
    return {"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)}


def mount_from_json(obj: dict[str, Any]) -> Mount:
    """The :class:`Mount` that :func:`mount_to_json` recorded."""
    return Mount(
        type=str(obj["type"]),
        source=str(obj["source"]),
        target=str(obj.get("target", "")),
        options=tuple(str(o) for o in obj.get("options", ())),
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if it is missing or not an object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` atomically with ``obj`` as JSON (0600)."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")


def output_log(bundle: Path, meta: dict[str, Any] | None = None) -> Path:
    """Where the bundle's detached task writes its output: the ``output`` its
    ``meta`` (default: its meta.json) names, else ``output.log`` in the bundle."""
    if meta is None:
        meta = read_json(bundle / "meta.json") or {}
    named = meta.get("output")
    return Path(named) if isinstance(named, str) and named else bundle / "output.log"


def read_pid(path: Path) -> int | None:
    """The pid written to ``path`` (by runc's ``--pid-file``, say); None if absent."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def mount_rootfs(bundle: Path, mounts: Sequence[Mount]) -> None:
    """Mount ``mounts`` on the bundle's ``rootfs/`` exactly as given.

    As containerd's shim does, the snapshotter's mounts keep their setuid bits
    and devices: the container's own mount namespace is what confines them.
    """
    mount_all(mounts, bundle / "rootfs", allow_suid=True, allow_dev=True)


# -- the state directory -------------------------------------------------------------


class Bundles:
    """The bundles (and runc's state) under one state directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir).absolute()
        # owner-only like the rest of a root: runc runs as root, and a container's
        # processes see only its rootfs mount, never these directories
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.state_dir / ".locks").mkdir(mode=0o700, exist_ok=True)
        tag = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:8]
        self._cgroup_prefix = f"lamina/{tag}-"

    @property
    def runc_root(self) -> Path:
        """runc's own state directory (``runc --root``)."""
        return self.state_dir / "runc"

    def path(self, task_id: str) -> Path:
        """The bundle directory of ``task_id`` (whether or not it exists)."""
        return self.state_dir / validate_id(task_id)

    def lock(self, task_id: str) -> contextlib.AbstractContextManager[None]:
        """Serialise start, restore and delete of ``task_id`` (across processes)."""
        return locked(self.state_dir / ".locks" / f"{task_id}.lock", transient=True)

    def exists(self, task_id: str) -> bool:
        """Whether ``task_id`` has a complete bundle (one with ``meta.json``)."""
        return (self.path(task_id) / "meta.json").exists()

    def require(self, task_id: str) -> Path:
        """The bundle of ``task_id``; :class:`NotFound` if there is none."""
        bundle = self.path(task_id)
        if not (bundle / "meta.json").exists():
            raise NotFound(f"task {task_id!r} not found")
        return bundle

    def task_ids(self) -> Iterator[str]:
        """The ids of every complete bundle, in order."""
        for entry in sorted(self.state_dir.iterdir()):
            if is_task_id(entry.name) and (entry / "meta.json").exists():
                yield entry.name

    def cgroups_path(self, task_id: str) -> str:
        """The (runc-relative) cgroup a task gets when its spec names none."""
        return self._cgroup_prefix + task_id

    def create(
        self,
        task_id: str,
        mounts: Sequence[Mount],
        spec: dict[str, Any],
        *,
        detached: bool,
        extra_meta: dict[str, Any] | None = None,
    ) -> Path:
        """A new bundle for ``task_id``: ``spec`` as its config, ``mounts`` on its rootfs.

        ``spec`` is copied with the root path set to ``rootfs`` and, when it
        names no cgroup, :meth:`cgroups_path`. ``meta.json`` records the mounts,
        ``detached``, the creation time and ``extra_meta``. Call it with
        :meth:`lock` held.
        """
        bundle = self.path(task_id)
        if (bundle / "meta.json").exists():
            raise AlreadyExists(f"task {task_id!r} already exists")
        if bundle.exists():
            # left by a start that died before writing meta.json: nothing was
            # launched from it (runc only runs after that), so it can go
            self.remove(bundle)
        if not mounts:
            raise InvalidArgument("a task needs at least one rootfs mount")
        if not isinstance(spec.get("process"), dict) or not spec["process"].get("args"):
            raise InvalidArgument("spec has no process args")
        if detached and spec["process"].get("terminal"):
            raise InvalidArgument("a detached task cannot have a terminal")
        config = copy.deepcopy(spec)
        config.setdefault("root", {})["path"] = "rootfs"
        linux = config.setdefault("linux", {})
        if not linux.get("cgroupsPath") and not rootless.active():
            # (rootless, runc skips a cgroup it may not create only when none is named)
            linux["cgroupsPath"] = self.cgroups_path(task_id)
        bundle.mkdir(mode=0o700)
        try:
            if any(ns.get("type") == "user" for ns in linux.get("namespaces") or []):
                reachable_from_userns(bundle)  # runc mounts rootfs from inside the userns
            rootfs = bundle / "rootfs"
            rootfs.mkdir(mode=0o700)  # covered by the container's root filesystem
            write_json(bundle / "config.json", config)
            mount_rootfs(bundle, mounts)
            meta = {
                "id": task_id,
                "created": time.time(),
                "detached": detached,
                "mounts": [mount_to_json(m) for m in mounts],
            }
            meta.update(extra_meta or {})
            write_json(bundle / "meta.json", meta)
        except BaseException:
            self.remove(bundle)
            raise
        return bundle

    def remove(self, bundle: Path) -> None:
        """Unmount the bundle's rootfs and remove the directory.

        If the rootfs stays mounted (busy), nothing is removed: deleting files
        through a live mount would delete the snapshot's contents.
        """
        rootfs = bundle / "rootfs"
        if rootfs.exists():
            unmount_all(rootfs)
            if is_mountpoint(rootfs):
                raise Internal(f"{rootfs} is still mounted; not removing the bundle")
        remove_tree(bundle)
