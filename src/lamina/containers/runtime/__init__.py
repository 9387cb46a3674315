"""The layer below container records: run processes of a rootfs with runc.

* :mod:`.spec` — OCI runtime specs from an image config (:func:`generate_spec`).
* :mod:`.tasks` — :class:`TaskManager`: start/exec/kill/pause/delete/checkpoint.
* :mod:`.command` — is the task's command in the rootfs (before runc is asked).
* :mod:`.criu` — checkpoint/restore through ``runc checkpoint``/``restore``.
* :mod:`.launch` — runc in a bundle, in the foreground (with the :class:`Stdio`
  it is given) or under the shim (:mod:`.shim`), and a task's state read back.
* :mod:`.bundle` — the state directory: bundle layout, locks, create/remove.
* :mod:`.runc` — the typed wrapper around the ``runc`` command line.

From :mod:`.tasks` down, each module uses only public names of those below it.
"""

from __future__ import annotations

from .command import CommandNotExecutable, CommandNotFound, check_command
from .criu import CheckpointInfo, criu_available
from .launch import INHERIT_STDIO, Stdio
from .runc import find_runc
from .spec import BindMount, generate_spec, parse_mount_flag, parse_volume_flag, resolve_user
from .tasks import Task, TaskInfo, TaskManager, TaskStatus

__all__ = [
    "INHERIT_STDIO",
    "BindMount",
    "CheckpointInfo",
    "CommandNotExecutable",
    "CommandNotFound",
    "Stdio",
    "Task",
    "TaskInfo",
    "TaskManager",
    "TaskStatus",
    "check_command",
    "criu_available",
    "find_runc",
    "generate_spec",
    "parse_mount_flag",
    "parse_volume_flag",
    "resolve_user",
]
