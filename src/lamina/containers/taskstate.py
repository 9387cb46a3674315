"""A container's task as the container services see it: is there one, is it live, thaw it.

A container's task has the container's id. Starting and stopping tasks,
checkpointing them and putting right what an interrupted checkpoint left
(a paused task) ask the same questions of the :class:`TaskManager`; they ask
them here rather than of one another.
"""

from __future__ import annotations

from lamina.containers.runtime import TaskInfo, TaskManager, TaskStatus
from lamina.errors import NotFound

__all__ = ["is_live", "resume_paused", "task_of"]


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
