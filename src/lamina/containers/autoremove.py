"""Remove a container when its detached task ends: what ``lamina run -d --rm`` asks.

A detached task is watched by its shim (:mod:`lamina.containers.runtime.shim`),
which knows runc, not containers. ``run -d --rm`` therefore starts one more
small process, ``lamina container rm --after-exit ID``, which waits for the
shim to exit (without polling: :func:`~lamina.containers.taskstate.wait_ended`)
and then removes the container, as ``container rm --force`` would.

It leaves the container alone when the task was stopped by lamina to run
again or to be checkpointed (:func:`~lamina.containers.taskstate.keep`: an
upgrade, a rollback, a checkpoint that exits), and when the task is gone
already (``task delete`` took it: the container was kept on purpose). The
watcher holds no lock and no open root while it waits.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from lamina.containers.runtime import TaskManager, TaskStatus
from lamina.containers.service import ContainerService
from lamina.containers.taskstate import is_kept, task_of, wait_ended
from lamina.errors import NotFound

__all__ = ["remove_after_exit"]


def remove_after_exit(
    tasks: TaskManager, cid: str, service: Callable[[], AbstractContextManager[ContainerService]]
) -> bool:
    """Wait for ``cid``'s task to end, then remove the container unless it was kept
    (see the module docs); whether it was removed. ``service`` opens the
    container service once the wait is over."""
    wait_ended(tasks, cid)
    info = task_of(tasks, cid)
    if info is None or info.status != TaskStatus.STOPPED or is_kept(tasks, cid):
        return False
    with service() as ct:
        try:
            ct.remove(cid, force=True, sync=True)
        except NotFound:  # removed meanwhile
            return False
    return True
