"""The container service: every container operation, on one root and snapshotter.

It composes the three services below it and is the only module that calls
more than one of them:

* :class:`~lamina.containers.revisions.Revisions` — records and revision
  snapshots (create, upgrade, roll back, prune, remove);
* :class:`~lamina.containers.tasks.ContainerTasks` — runtime specs and tasks
  (the mounts they run on, stop, delete);
* :class:`~lamina.containers.checkpoint.Checkpoints` — checkpoint images
  (write, read, restore's parts, recovery of interrupted ones).

Those three never call one another. What an operation needs from two of them
is sequenced here: starting a task generates its spec on the revision's
mounts, records it, then runs the task; removing a container deletes its task,
then its revisions and record; restoring a checkpoint creates a container,
fills its revision from the checkpoint, records the spec and restores the task.

The :class:`TaskManager` (and with it ``runc``) is only looked for when an
operation needs a task, so records and revisions work on a host without runc.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from lamina.containers.logs import ContainerLogs
from lamina.containers.network import Networks, apply_network, network_mode
from lamina.containers.options import bind_mounts, options_of, userns_of
from lamina.containers.revisions import Revision, Revisions
from lamina.containers.runtime import INHERIT_STDIO, Stdio, TaskInfo, TaskManager, TaskStatus
from lamina.containers.tasks import ContainerTasks, tasks_dir
from lamina.containers.taskstate import is_live, keep, task_of
from lamina.errors import Damaged
from lamina.fs.files import locked
from lamina.images.service import ImageService
from lamina.metadata.containers import Container
from lamina.metadata.gc import collect
from lamina.metadata.root import Root

# Checkpoints (CRIU, layer diffs and applies, image documents: ~20 ms of imports)
# are imported by the methods that checkpoint or restore; run, exec, rm do not (startup).
if TYPE_CHECKING:
    from lamina.containers.checkpoint import (
        Checkpoint,
        CheckpointResult,
        Checkpoints,
        RestoreResult,
    )

__all__ = ["ContainerService"]


class ContainerService:
    """Containers, their revisions, tasks and checkpoints on one root and snapshotter."""

    def __init__(self, root: Root, *, snapshotter: str = "overlay",
                 images: ImageService | None = None, tasks: TaskManager | None = None) -> None:
        self.root = root
        self.images = images or ImageService(root, snapshotter=snapshotter)
        self._revisions = Revisions(root, snapshotter=snapshotter, images=self.images)
        self._logs = ContainerLogs(root.path)
        self._networks = Networks(root.path)
        self._given_tasks = tasks

    @cached_property
    def tasks(self) -> TaskManager:
        """The root's task manager (``runc`` must be installed)."""
        return self._given_tasks or TaskManager(tasks_dir(self.root.path))

    @cached_property
    def _tasks(self) -> ContainerTasks:
        return ContainerTasks(self.root, images=self.images, tasks=self.tasks)

    @cached_property
    def _checkpoints(self) -> Checkpoints:
        from lamina.containers.checkpoint import Checkpoints  # see the imports (startup)

        return Checkpoints(self.root, images=self.images, tasks=self.tasks)

    def close(self) -> None:
        """Reap what the task manager this service made started; the stores belong to the root."""
        if self._given_tasks is None and "tasks" in self.__dict__:
            self.tasks.close()

    # -- records and revisions ---------------------------------------------------

    def get(self, cid: str) -> Container:
        return self._revisions.get(cid)

    def list(self) -> builtins.list[Container]:
        return self._revisions.list()

    def readable(self) -> tuple[builtins.list[Container], builtins.list[Damaged]]:
        """The containers whose records read, and the error of each damaged one."""
        return self._revisions.readable()

    def options(self, container: Container) -> dict[str, Any]:
        """The options ``container`` was created with (see :mod:`lamina.containers.options`)."""
        return options_of(container)

    def create(self, image: str, cid: str, *, labels: Mapping[str, str] | None = None,
               options: Mapping[str, Any] | None = None) -> Container:
        """A new container on ``image`` (no task yet)."""
        return self._revisions.create(image, cid, labels=labels, options=options)

    def revisions(self, cid: str) -> builtins.list[Revision]:
        """Every revision of ``cid``, oldest first."""
        return self._revisions.revisions(cid)

    def upgrade(self, cid: str, image: str) -> Container:
        """Move ``cid`` to ``image``, carrying its rw-layer changes over."""
        return self._revisions.upgrade(cid, image)

    def rollback(self, cid: str) -> Container:
        """Point ``cid`` back at its previous revision."""
        return self._revisions.rollback(cid)

    def prune_revisions(self, cid: str, *, keep: int) -> builtins.list[str]:
        """Remove all but the ``keep`` newest revisions (never the current one)."""
        return self._revisions.prune_revisions(cid, keep=keep)

    def _turn(self, cid: str) -> contextlib.AbstractContextManager[None]:
        """Held by what takes ``cid``'s task through states another such operation
        would meet half-way — checkpoint, upgrade and rollback (around the stop and
        start), remove — so they take turns: two CRIU dumps of one task failed on
        each other's seizing or hung, and left the task paused."""
        name = hashlib.sha256(cid.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return locked(self.root.path / "locks" / "containers" / name, transient=True)

    def require(self, cid: str) -> None:
        """NotFound unless container ``cid`` has a record (a damaged one counts)."""
        with contextlib.suppress(Damaged):
            self._revisions.get(cid)

    def remove(self, cid: str, *, force: bool = False, sync: bool = False) -> builtins.list[str]:
        """Remove the container: its task (live ones only with ``force``), revisions,
        record; returns the removed revision keys. With ``sync``, collect garbage
        before returning (containerd's SynchronousDelete: see
        :mod:`lamina.metadata.deletes`), so what only the container kept is freed.
        A damaged record is removed too (the way out ``check`` names): nothing of
        it needs reading."""
        self.require(cid)
        with self._turn(cid):
            self._tasks.remove(cid, force=force)
            self._networks.detach(cid)
            removed = self._revisions.remove(cid)
            self._logs.remove(cid)
        if sync:
            collect(self.root)
        return removed

    # -- tasks -------------------------------------------------------------------

    def task(self, cid: str) -> TaskInfo | None:
        """The container's task, or None when it has none."""
        return task_of(self.tasks, cid)

    def is_live(self, cid: str) -> bool:
        return is_live(self.tasks, cid)

    def start(
        self,
        cid: str,
        *,
        detach: bool,
        terminal: bool = False,
        console_size: tuple[int, int] | None = None,
        stdio: Stdio = INHERIT_STDIO,
    ) -> TaskInfo:
        """Start the container's task (a stopped task of it is deleted first).

        The runtime spec is generated on the current revision and recorded on
        the container before the task runs. Foreground: returns when the
        process exits, with its exit code; with ``terminal`` it gets a
        pseudo-terminal (``console_size`` rows and columns) that runc joins to the
        caller's (set raw while the task runs, window size changes passed on,
        restored). Detached: returns once it runs
        (its output appended to the container's log: :meth:`logs`).
        """
        container = self._revisions.get(cid)
        self._tasks.clear_stopped(cid)
        spec = self._tasks.generate(container, self._revisions.mounts(container),
                                    terminal=terminal, console_size=console_size)
        try:
            spec = self._attach(container, spec)
            container = self._revisions.set_spec(container, spec)
            mounts = self._tasks.run_mounts(container, self._revisions.mounts(container))
            output = self._logs.prepare(cid) if detach else None
            info = self.tasks.start(cid, mounts, spec, detach=detach,
                                    stdio=stdio, output=output)
        except BaseException:
            with contextlib.suppress(Exception):
                self._networks.detach(cid)
            raise
        if not detach:
            self._networks.detach(cid)  # its process has exited
        return info

    def _attach(self, container: Container, spec: dict[str, Any]) -> dict[str, Any]:
        """``spec`` on the container's network (see :mod:`lamina.containers.network`),
        attached now unless it is already."""
        options = options_of(container)
        attachment = self._networks.attach(
            container.id, network_mode(options), hostname=spec.get("hostname") or container.id,
            userns=userns_of(options) is not None)
        return apply_network(spec, attachment, user_destinations=frozenset(
            m.destination for m in bind_mounts(options)))

    def logs(self, cid: str, *, follow: bool = False, tail: int | None = None,
             poll: float = 0.2) -> Iterator[bytes]:
        """What the container's detached tasks wrote (see :mod:`lamina.containers.logs`);
        with ``tail``, its last lines only. ``follow`` goes on with what the task
        writes until it stops (or is deleted)."""
        self._revisions.get(cid)
        if not follow:
            return self._logs.read(cid, tail=tail)
        return self._logs.follow(cid, done=self._writing_done(cid), tail=tail, poll=poll)

    def _writing_done(self, cid: str) -> Callable[[], bool]:
        """Whether ``cid``'s task has written its last output: it is gone, or stopped
        and its shim has recorded the exit (after copying the last output), or has
        been stopped for a few seconds without (a foreground or killed monitor)."""
        stopped_at: list[float] = []

        def done() -> bool:
            info = self.task(cid)
            if info is None:
                return True
            if info.status != TaskStatus.STOPPED:
                return False
            if info.exit_code is not None or not info.detached:
                return True
            if not stopped_at:
                stopped_at.append(time.monotonic())
            return time.monotonic() - stopped_at[0] > 5.0

        return done

    def stop(self, cid: str, *, timeout: float = 10.0) -> TaskInfo | None:
        """Stop (SIGTERM, then SIGKILL after ``timeout``) and delete the task, if any;
        its network goes with it."""
        info = self._tasks.stop(cid, timeout=timeout)
        self._networks.detach(cid)
        return info

    @contextlib.contextmanager
    def stopped(self, cid: str, *, timeout: float = 10.0) -> Iterator[bool]:
        """Stop a live task for the block; start it again (detached) after it.

        Yields whether the task was live (and so will be restarted). It is
        restarted even when the block fails, on whatever revision the
        container then points at.
        """
        with self._turn(cid):
            was_live = self.is_live(cid)
            if self.task(cid) is not None:
                keep(self.tasks, cid)  # stopped to run again: not the container's end
                self.stop(cid, timeout=timeout)
            try:
                yield was_live
            finally:
                if was_live:
                    self.start(cid, detach=True)

    # -- checkpoints ---------------------------------------------------------------

    def checkpoint(self, cid: str, ref: str | None = None, *, exit: bool = False,
                   binds: bool = False) -> CheckpointResult:
        """Checkpoint the running task of ``cid`` into image ``ref`` (see
        :meth:`Checkpoints.checkpoint`)."""
        with self._turn(cid):
            return self._checkpoints.checkpoint(self._revisions.get(cid), ref, exit=exit,
                                                binds=binds)

    def read_checkpoint(self, ref: str) -> Checkpoint:
        """The checkpoint registered as image ``ref``."""
        return self._checkpoints.read(ref)

    def list_checkpoints(self) -> builtins.list[Checkpoint]:
        """Every image of this root that is a readable checkpoint."""
        return self._checkpoints.list()

    def restore(self, ref: str, cid: str, *, bind_root: str | os.PathLike[str] | None = None,
                binds: bool = False, detach: bool = True) -> RestoreResult:
        """Restore checkpoint ``ref`` as a new container ``cid`` with a running task.

        Bind mount contents archived with the checkpoint go back to their
        original sources with ``binds``, or with ``bind_root`` to
        ``<bind_root>/<destination>`` (and the new container mounts them from
        there); a checkpoint carrying them is refused with neither. On failure
        the new container, if made, is removed again.
        """
        from lamina.containers.checkpoint import RestoreResult  # see the imports (startup)

        container: Container | None = None
        try:
            with self._checkpoints.restoring(ref, cid, bind_root=bind_root,
                                             binds=binds) as job:
                with job.phase("create"):
                    container = self._revisions.create(job.image, cid, labels=job.labels,
                                                       options=job.options)
                job.fill(self._revisions.mounts(container))
                job.spec = self._attach(container, job.spec)
                container = self._revisions.set_spec(container, job.spec)
                task = job.restore(cid, self._revisions.mounts(container), detach=detach)
        except BaseException:
            if container is not None:
                with contextlib.suppress(Exception):
                    self.remove(cid, force=True)
            raise
        return RestoreResult(container=container, task=task, timings=job.done())

    def interrupted(self) -> builtins.list[str]:
        """What checkpoints and restores that died left behind, in sentences."""
        return self._checkpoints.interrupted()

    def recover_interrupted(self) -> builtins.list[str]:
        """Put right what checkpoints and restores that died left behind; what was done."""
        return self._checkpoints.recover_interrupted()
