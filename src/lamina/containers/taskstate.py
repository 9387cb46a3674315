"""A container's task as the container services see it: is there one, is it live, thaw it,
wait for its end, was it stopped on purpose.

A container's task has the container's id. Starting and stopping tasks,
checkpointing them and putting right what an interrupted checkpoint left
(a paused task) ask the same questions of the :class:`TaskManager`; they ask
them here rather than of one another.

A task that lamina itself stops to start again (an upgrade, a rollback) or to
checkpoint is *kept*: a mark in its bundle tells whoever removes the container
when its task ends (``run -d --rm``, :mod:`lamina.containers.autoremove`)
that this end is not the container's.
"""

from __future__ import annotations

import contextlib
import os
import select
import time

from lamina.containers.runtime import TaskInfo, TaskManager, TaskStatus
from lamina.errors import NotFound
from lamina.util.signals import deferred

__all__ = ["Hold", "is_kept", "is_live", "keep", "resume_paused", "task_of", "unkeep",
           "wait_ended"]

_KEEP = "container-kept"


def task_of(tasks: TaskManager, cid: str) -> TaskInfo | None:
    """The container's task, or None when it has none."""
    try:
        return tasks.state(cid)
    except NotFound:
        return None


def is_live(tasks: TaskManager, cid: str) -> bool:
    """Whether the container has a task that has not stopped (running or paused)."""
    info = task_of(tasks, cid)
    return info is not None and info.status != TaskStatus.STOPPED


def resume_paused(tasks: TaskManager, cid: str) -> bool:
    """Thaw the container's task if it is paused; whether it was."""
    info = task_of(tasks, cid)
    if info is None or info.status != TaskStatus.PAUSED:
        return False
    tasks.resume(cid)
    return True


class Hold:
    """A task lamina pauses while it saves it, and knows whether it holds it paused."""

    def __init__(self, tasks: TaskManager, cid: str) -> None:
        self.tasks, self.cid = tasks, cid
        self.paused = False

    def pause(self) -> None:
        self.paused = True  # first: interrupted in the pause, it is let go all the same
        self.tasks.pause(self.cid)

    def resume(self) -> None:
        """Let the task go: thawed if it is still paused (a dump may have stopped
        it), whatever signal comes meanwhile."""
        self.paused = False
        with deferred():
            resume_paused(self.tasks, self.cid)

    def ended(self) -> None:
        """The task is held no more: it ended (an exiting dump stops it)."""
        self.paused = False

    def settle(self, seconds: float) -> None:
        """Wait ``seconds`` before another try at what failed on the task: a held
        task runs meanwhile and is paused again after."""
        held, self.paused = self.paused, False
        if held:  # CRIU may have left it thawed after a failed try
            resume_paused(self.tasks, self.cid)
        time.sleep(seconds)
        if held:
            self.pause()


def keep(tasks: TaskManager, cid: str) -> None:
    """Mark the container's task as stopped by lamina on purpose (see the module docs)."""
    bundle = tasks.bundle(cid)
    if bundle.is_dir():
        (bundle / _KEEP).touch()


def unkeep(tasks: TaskManager, cid: str) -> None:
    """Take back :func:`keep`: the task runs again (restored where it stopped)."""
    (tasks.bundle(cid) / _KEEP).unlink(missing_ok=True)


def is_kept(tasks: TaskManager, cid: str) -> bool:
    """Whether the container's task was marked by :func:`keep`."""
    return (tasks.bundle(cid) / _KEEP).exists()


def wait_ended(tasks: TaskManager, cid: str) -> None:
    """Block until the container's detached task has ended (its shim has exited).

    A pidfd becomes readable when its process exits, so the wait costs
    nothing however long the task runs (polling runc's state would start a
    process every time).
    """
    pid = tasks.launcher.shim_pid(tasks.bundle(cid))
    if pid is None:
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        # the shim may have exited and another process got its pid before the open
        if tasks.launcher.shim_pid(tasks.bundle(cid)) == pid:
            select.select([fd], [], [])
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
