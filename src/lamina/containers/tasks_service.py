"""Containers' tasks: runtime specs from image + options, start, stop, restart.

A container's task has the container's id and runs in ``<root>/tasks`` (one
:class:`~lamina.containers.runtime.TaskManager`). Starting a task generates
the runtime spec from the image config and the container's stored options
(args, env, bind mounts), with the container's current revision mounted
read-only on a temporary directory so that user and group names resolve
against the image's own ``/etc/passwd``; the spec is recorded on the
container (:meth:`ContainerService.set_spec`) and the task runs on the
revision snapshot's mounts.

Options, as kept in ``spec.annotations["lamina.io/options"]``::

    {"args": ["sh", "-c", "..."] | null,   # replaces the image's Cmd
     "env": ["K=V", ...],
     "mounts": [{"source": "/abs", "destination": "/abs", "readonly": false}, ...],
     "userns": {"uids": ["0:HOST:SIZE"], "gids": ["0:HOST:SIZE"]}}   # optional

A container with ``userns`` runs in a user namespace of its own with those
mappings, and its root filesystem is mounted ID-mapped (:mod:`lamina.mounts.idmap`):
the image's layers show their own owners inside and are never chowned.
"""

from __future__ import annotations

import contextlib
import signal as _signal
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lamina.containers.revisions import ContainerService
from lamina.containers.runtime import BindMount, TaskInfo, TaskManager, TaskStatus, generate_spec
from lamina.errors import FailedPrecondition, InvalidArgument, LaminaError, NotFound
from lamina.labels import IMAGE_ANNOTATION
from lamina.metadata.containers import Container
from lamina.mounts.idmap import UserNamespace, with_idmap
from lamina.mounts.mount import Mount, temp_mount

__all__ = [
    "ContainerTasks",
    "bind_mounts",
    "make_options",
    "readonly_mounts",
    "tasks_dir",
    "userns_of",
]


def tasks_dir(root_path: str | Path) -> Path:
    """Where a root's tasks live."""
    return Path(root_path) / "tasks"


def make_options(
    *,
    args: Sequence[str] | None = None,
    env: Sequence[str] = (),
    mounts: Sequence[BindMount] = (),
    userns: UserNamespace | None = None,
) -> dict[str, Any]:
    """The options record a container keeps (see the module docs)."""
    for item in env:
        if not item.partition("=")[0]:
            raise InvalidArgument(f"invalid environment entry {item!r} (want KEY=VALUE)")
    extra: dict[str, Any] = {} if userns is None else {"userns": userns.to_json()}
    return {
        **extra,
        "args": list(args) if args else None,
        "env": list(env),
        "mounts": [
            {"source": m.source, "destination": m.destination, "readonly": m.readonly}
            for m in mounts
        ],
    }


def userns_of(options: Mapping[str, Any]) -> UserNamespace | None:
    """The user namespace an options record asks for (None: the host's)."""
    obj = options.get("userns")
    if not obj:
        return None
    try:
        return UserNamespace.from_json(obj)
    except (KeyError, TypeError) as exc:
        raise InvalidArgument(f"bad userns option {obj!r}") from exc


def bind_mounts(options: Mapping[str, Any]) -> list[BindMount]:
    """The bind mounts of an options record."""
    out = []
    for m in options.get("mounts") or []:
        out.append(BindMount(source=str(m["source"]), destination=str(m["destination"]),
                             readonly=bool(m.get("readonly", False))))
    return out


def readonly_mounts(mounts: Sequence[Mount]) -> list[Mount]:
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
    """Tasks of the containers of one :class:`ContainerService`."""

    def __init__(self, containers: ContainerService, tasks: TaskManager | None = None) -> None:
        self.containers = containers
        self.tasks = tasks or TaskManager(tasks_dir(containers.root.path))

    # -- queries ---------------------------------------------------------------

    def task(self, cid: str) -> TaskInfo | None:
        """The container's task, or None when it has none."""
        try:
            return self.tasks.state(cid)
        except NotFound:
            return None

    def is_live(self, cid: str) -> bool:
        info = self.task(cid)
        return info is not None and info.status != TaskStatus.STOPPED

    # -- spec ------------------------------------------------------------------

    def mounts(self, container: Container) -> list[Mount]:
        """The rootfs mounts of the container's current revision."""
        mounts: list[Mount] = self.containers.sn.mounts(container.snapshot_key)
        return mounts

    @contextlib.contextmanager
    def mounted_readonly(self, container: Container) -> Iterator[str]:
        """The container's filesystem, mounted read-only on a temporary directory."""
        with temp_mount(readonly_mounts(self.mounts(container)),
                        base=self.containers.root.tmpmounts) as target:
            yield target

    def generate(self, container: Container) -> dict[str, Any]:
        """The runtime spec for ``container`` (image config + its options)."""
        options = self.containers.options(container)
        _, config = self.containers.images.resolve(container.image)
        with self.mounted_readonly(container) as rootfs:
            spec = generate_spec(
                config.raw,
                args=options.get("args") or None,
                env_extra=[str(e) for e in options.get("env") or []],
                mounts=bind_mounts(options),
                hostname=container.id[:63],
                rootfs=rootfs,
            )
        userns = userns_of(options)
        if userns is not None:
            linux = spec.setdefault("linux", {})
            linux.setdefault("namespaces", []).append({"type": "user"})
            linux.update(userns.spec())
        spec.setdefault("annotations", {})[IMAGE_ANNOTATION] = container.image
        return spec

    # -- life cycle --------------------------------------------------------------

    def start(
        self,
        cid: str,
        *,
        detach: bool,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> TaskInfo:
        """Start the container's task (a stopped task of it is deleted first).

        Foreground: returns when the process exits, with its exit code.
        Detached: returns once it runs (output in the task's ``output.log``).
        """
        container = self.containers.get(cid)
        existing = self.task(cid)
        if existing is not None:
            if existing.status != TaskStatus.STOPPED:
                raise FailedPrecondition(f"container {cid!r} already has a {existing.status} task")
            self.tasks.delete(cid)
        spec = self.generate(container)
        container = self.containers.set_spec(container, spec)
        mounts = self.mounts(container)
        userns = userns_of(self.containers.options(container))
        if userns is not None:
            mounts = with_idmap(mounts, userns)
        return self.tasks.start(cid, mounts, spec, detach=detach,
                                stdin=stdin, stdout=stdout, stderr=stderr)

    def stop(self, cid: str, *, timeout: float = 10.0) -> TaskInfo | None:
        """Stop (SIGTERM, then SIGKILL after ``timeout``) and delete the task, if any.

        Returns the task's last state (None when there was no task).
        """
        info = self.task(cid)
        if info is None:
            return None
        if info.status == TaskStatus.PAUSED:
            with contextlib.suppress(LaminaError):
                self.tasks.resume(cid)
        if info.status != TaskStatus.STOPPED:
            with contextlib.suppress(FailedPrecondition, NotFound):
                self.tasks.kill(cid, _signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.is_live(cid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.is_live(cid):
                with contextlib.suppress(FailedPrecondition, NotFound):
                    self.tasks.kill(cid, _signal.SIGKILL, all=True)
                with contextlib.suppress(LaminaError):
                    self.tasks.wait(cid, timeout=10.0)
        return self.tasks.delete(cid, force=True)

    @contextlib.contextmanager
    def stopped(self, cid: str, *, timeout: float = 10.0) -> Iterator[bool]:
        """Stop a live task for the block; start it again (detached) after it.

        Yields whether the task was live (and so will be restarted). It is
        restarted even when the block fails, on whatever revision the
        container then points at.
        """
        was_live = self.is_live(cid)
        if self.task(cid) is not None:
            self.stop(cid, timeout=timeout)
        try:
            yield was_live
        finally:
            if was_live:
                self.start(cid, detach=True)

    def remove(self, cid: str, *, force: bool = False) -> list[str]:
        """Remove the container: its task (live ones only with ``force``), revisions, record."""
        self.containers.get(cid)
        info = self.task(cid)
        if info is not None:
            if info.status != TaskStatus.STOPPED and not force:
                raise FailedPrecondition(
                    f"container {cid!r} has a {info.status} task; stop it or use --force")
            if info.status != TaskStatus.STOPPED:
                with contextlib.suppress(FailedPrecondition, NotFound):
                    self.tasks.kill(cid, _signal.SIGKILL, all=True)
            self.tasks.delete(cid, force=True)
        return self.containers.remove(cid)

    def close(self) -> None:
        self.tasks.close()
