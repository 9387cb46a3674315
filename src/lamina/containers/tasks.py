"""Containers' tasks: runtime specs from image + options, the mounts they run on, stop, delete.

A container's task has the container's id and runs in ``<root>/tasks`` (one
:class:`~lamina.containers.runtime.TaskManager`). Its runtime spec comes from
the image config and the container's options (:mod:`lamina.containers.options`),
with the container's current revision mounted read-only on a temporary
directory so that user and group names resolve against the image's own
``/etc/passwd``. The caller hands in the revision's mounts and records the
spec on the container; this module never touches records or snapshots.
"""

from __future__ import annotations

import contextlib
import signal as _signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lamina.containers.options import bind_mounts, options_of, userns_of
from lamina.containers.runtime import (
    TaskInfo,
    TaskManager,
    TaskStatus,
    check_command,
    generate_spec,
)
from lamina.containers.taskstate import is_live, task_of
from lamina.errors import FailedPrecondition, LaminaError, NotFound
from lamina.images.service import ImageService
from lamina.labels import IMAGE_ANNOTATION
from lamina.metadata.containers import Container
from lamina.metadata.root import Root
from lamina.mounts.idmap import with_idmap
from lamina.mounts.mount import Mount, temp_mount

__all__ = ["ContainerTasks", "tasks_dir"]


def tasks_dir(root_path: str | Path) -> Path:
    """Where a root's tasks live."""
    return Path(root_path) / "tasks"


def _readonly_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    """``mounts`` changed so that mounting them writes nothing (overlay: upper as a lower)."""
    out = []
    for m in mounts:
        opts = [o for o in m.options if o not in ("rw", "ro")]
        if m.type == "overlay":
            upper = next((o[len("upperdir="):] for o in opts if o.startswith("upperdir=")), "")
            opts = [o for o in opts if not o.startswith(("upperdir=", "workdir="))]
            if upper:
                opts = [f"lowerdir={upper}:{o[len('lowerdir='):]}" if o.startswith("lowerdir=")
                        else o for o in opts]
        out.append(Mount(m.type, m.source, m.target, (*opts, "ro")))
    return out


class ContainerTasks:
    """The tasks of the containers of one root, on one :class:`TaskManager`."""

    def __init__(self, root: Root, *, images: ImageService, tasks: TaskManager) -> None:
        self.root = root
        self.images = images
        self.tasks = tasks

    def generate(self, container: Container, mounts: Sequence[Mount], *,
                 terminal: bool = False,
                 console_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The runtime spec for ``container`` (image config + its options) on ``mounts``,
        its current revision's; ``terminal``: the process gets a pseudo-terminal, of
        ``console_size`` (rows, columns) from its start when given.

        A command the rootfs does not have is refused here (see
        :mod:`lamina.containers.runtime.command`)."""
        options = options_of(container)
        _, config = self.images.resolve(container.image)
        with temp_mount(_readonly_mounts(mounts), base=self.root.tmpmounts) as rootfs:
            spec = generate_spec(
                config.raw,
                args=options.get("args") or None,
                env_extra=[str(e) for e in options.get("env") or []],
                mounts=bind_mounts(options),
                terminal=terminal,
                hostname=container.id[:63],
                cwd=options.get("cwd") or None,
                user=options.get("user") or None,
                rootfs=rootfs,
            )
            check_command(spec, rootfs)
        if terminal and console_size is not None:
            # runc sizes the terminal before the process starts; its own resize
            # from the caller's terminal comes only after (a race with the process)
            rows, cols = console_size
            spec["process"]["consoleSize"] = {"height": rows, "width": cols}
        userns = userns_of(options)
        if userns is not None:
            linux = spec.setdefault("linux", {})
            linux.setdefault("namespaces", []).append({"type": "user"})
            linux.update(userns.spec())
        spec.setdefault("annotations", {})[IMAGE_ANNOTATION] = container.image
        return spec

    def clear_stopped(self, cid: str) -> None:
        """Make room for a new task of ``cid``: delete a stopped one; a live one is an error."""
        existing = task_of(self.tasks, cid)
        if existing is not None:
            if existing.status != TaskStatus.STOPPED:
                raise FailedPrecondition(f"container {cid!r} already has a {existing.status} task")
            self.tasks.delete(cid)

    def run_mounts(self, container: Container, mounts: Sequence[Mount]) -> list[Mount]:
        """The mounts ``container``'s task runs on: its revision's ``mounts``, ID-mapped
        when it has a user namespace of its own."""
        userns = userns_of(options_of(container))
        return list(mounts) if userns is None else with_idmap(mounts, userns)

    def stop(self, cid: str, *, timeout: float = 10.0) -> TaskInfo | None:
        """Stop (SIGTERM, then SIGKILL after ``timeout``) and delete the task, if any.

        Returns the task's last state (None when there was no task).
        """
        info = task_of(self.tasks, cid)
        if info is None:
            return None
        if info.status == TaskStatus.PAUSED:
            with contextlib.suppress(LaminaError):
                self.tasks.resume(cid)
        if info.status != TaskStatus.STOPPED:
            with contextlib.suppress(FailedPrecondition, NotFound):
                self.tasks.kill(cid, _signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while is_live(self.tasks, cid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if is_live(self.tasks, cid):
                with contextlib.suppress(FailedPrecondition, NotFound):
                    self.tasks.kill(cid, _signal.SIGKILL, all=True)
                with contextlib.suppress(LaminaError):
                    self.tasks.wait(cid, timeout=10.0)
        return self.tasks.delete(cid, force=True)

    def remove(self, cid: str, *, force: bool = False) -> None:
        """Delete the container's task, if any (a live one only with ``force``: killed)."""
        info = task_of(self.tasks, cid)
        if info is None:
            return
        if info.status != TaskStatus.STOPPED and not force:
            raise FailedPrecondition(
                f"container {cid!r} has a {info.status} task; stop it or use --force")
        if info.status != TaskStatus.STOPPED:
            with contextlib.suppress(FailedPrecondition, NotFound):
                self.tasks.kill(cid, _signal.SIGKILL, all=True)
        self.tasks.delete(cid, force=True)
