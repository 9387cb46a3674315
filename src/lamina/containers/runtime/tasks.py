"""Tasks: processes of containers, run by runc out of per-container bundles.

A :class:`TaskManager` owns one state directory and composes the two layers
below it: :mod:`.bundle` lays out that directory (the bundle of each task, the
locks, runc's own state; its docstring shows the layout) and :mod:`.launch`
runs runc in a bundle, in the foreground or under the shim, and reads a task's
state back. Checkpoint and restore are :mod:`.criu`'s, on the same two layers.

Everything a later, unrelated lamina process needs is on disk, so tasks started
by one process are listed, signalled, paused, checkpointed and deleted by
another.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import os
import signal as _signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lamina import rootless
from lamina.errors import (
    FailedPrecondition,
    InvalidArgument,
    LaminaError,
    NotFound,
    Unavailable,
)
from lamina.mounts.mount import Mount

from . import criu
from .bundle import (
    Bundles,
    TaskInfo,
    TaskStatus,
    output_log,
    read_json,
    validate_id,
)
from .command import check_command
from .launch import INHERIT_STDIO, Launcher, Stdio
from .runc import Runc, parse_signal
from .spec import resolve_user

__all__ = ["Task", "TaskInfo", "TaskManager", "TaskStatus", "validate_id"]

Task = TaskInfo
"""What :meth:`TaskManager.start` returns: the task's state right after starting."""


def _merge_env(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in [*base, *extra]:
        key = item.partition("=")[0]
        if not key:
            raise InvalidArgument(f"invalid environment entry {item!r}")
        merged[key] = item
    return list(merged.values())


class TaskManager:
    """Runs and tracks runc containers under one state directory."""

    def __init__(
        self, state_dir: str | os.PathLike[str], *, runc_binary: str | None = None
    ) -> None:
        self.bundles = Bundles(state_dir)
        self.state_dir = self.bundles.state_dir
        self.runc = Runc(self.bundles.runc_root, binary=runc_binary)
        self.launcher = Launcher(self.bundles, self.runc)

    # -- paths ---------------------------------------------------------------

    def bundle(self, task_id: str) -> Path:
        """The bundle directory of ``task_id`` (whether or not it exists)."""
        return self.bundles.path(task_id)

    def rootfs(self, task_id: str) -> Path:
        return self.bundle(task_id) / "rootfs"

    def output_path(self, task_id: str) -> Path:
        """Where the task's detached output goes (see :meth:`start`'s ``output``)."""
        return output_log(self.bundle(task_id))

    def cgroups_path(self, task_id: str) -> str:
        """The (runc-relative) cgroup a task gets when its spec names none."""
        return self.bundles.cgroups_path(task_id)

    # -- public operations ---------------------------------------------------------

    def start(
        self,
        task_id: str,
        mounts: Sequence[Mount],
        spec: dict[str, Any],
        *,
        detach: bool,
        stdio: Stdio = INHERIT_STDIO,
        output: str | os.PathLike[str] | None = None,
    ) -> TaskInfo:
        """Mount ``mounts`` as the rootfs of a new bundle and run ``spec`` in it.

        Foreground (``detach=False``): the process gets ``stdio`` (by default
        the caller's streams), the call returns when it exits and the result
        carries its ``exit_code`` (128+N when killed by signal N). Detached: the
        output goes to ``output`` (appended to; its directory must exist), by
        default ``output.log`` in the bundle, rotated once it grows past
        :data:`~.bundle.OUTPUT_MAX`; the call returns once the process runs,
        with its ``pid``. Either way the task stays (stopped, once its process
        has exited) until :meth:`delete`.
        """
        validate_id(task_id)
        named = {"output": os.path.abspath(output)} if detach and output is not None else {}
        with self.bundles.lock(task_id):
            bundle = self.bundles.create(task_id, mounts, spec, detached=detach,
                                         extra_meta=named)
            args = ["run", "--bundle", str(bundle), "--pid-file", str(bundle / "runc.pid"), task_id]
            try:
                if detach:
                    return self.launcher.detached(task_id, bundle, args)
                return self.launcher.foreground(task_id, bundle, args, stdio=stdio)
            except LaminaError:
                self.launcher.cleanup_failed(task_id, bundle)
                raise

    def state(self, task_id: str) -> TaskInfo:
        """The task's status (created, running, paused, stopped), pid and exit code."""
        return self.launcher.info(task_id)

    def list(self) -> builtins.list[TaskInfo]:
        """Every task in the state directory, by id."""
        states = {str(s.get("id")): s for s in self.runc.list()}
        out: list[TaskInfo] = []
        for task_id in self.bundles.task_ids():
            with contextlib.suppress(NotFound):
                out.append(self.launcher.info(task_id, states.get(task_id), query=False))
        return out

    def wait(self, task_id: str, timeout: float | None = None) -> int | None:
        """Block until the task stops; its exit code (None if nobody saw it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bundle = self.bundles.require(task_id)
        while True:
            info = self.launcher.info(task_id)
            if info.status == TaskStatus.STOPPED:
                # the shim writes the exit code right after runc returns
                if info.exit_code is None and self.launcher.wait_shim(bundle, 5.0):
                    info = self.launcher.info(task_id)
                return info.exit_code
            if deadline is not None and time.monotonic() > deadline:
                raise Unavailable(f"task {task_id} still {info.status} after {timeout}s")
            time.sleep(0.05)

    @contextlib.contextmanager
    def _in_state(self, task_id: str, state: str) -> Iterator[None]:
        """A runc call on a task whose bundle exists: runc not finding the container
        means the task is not ``state`` (FailedPrecondition), not that it is unknown."""
        self.bundles.require(task_id)
        try:
            yield
        except NotFound as exc:
            raise FailedPrecondition(f"task {task_id} is not {state}") from exc

    def kill(self, task_id: str, signal: int | str = _signal.SIGTERM, *, all: bool = False) -> None:
        """Send ``signal`` to the task's init (``all``: to every process in it)."""
        sig = parse_signal(signal)
        with self._in_state(task_id, "running"):
            self.runc.kill(task_id, sig, all_processes=all)

    def pause(self, task_id: str) -> None:
        """Freeze every process of the task."""
        with self._in_state(task_id, "running"):
            self.runc.pause(task_id)

    def resume(self, task_id: str) -> None:
        """Thaw a paused task."""
        with self._in_state(task_id, "paused"):
            self.runc.resume(task_id)

    def ps(self, task_id: str) -> builtins.list[int]:
        """Host pids of the task's processes (empty once it stopped)."""
        self.bundles.require(task_id)
        try:
            return self.runc.ps(task_id)
        except (NotFound, FailedPrecondition):
            info = self.state(task_id)
            if rootless.active() and info.pid is not None:
                # runc ps reads the task's cgroup, and a rootless task has none
                return rootless.pids_in_pid_namespace(info.pid)
            return []

    def exec(
        self,
        task_id: str,
        args: Sequence[str],
        *,
        env: Sequence[str] = (),
        cwd: str | None = None,
        user: str | None = None,
        terminal: bool = False,
        console_size: tuple[int, int] | None = None,
        detach: bool = False,
        stdio: Stdio = INHERIT_STDIO,
        timeout: float | None = None,
    ) -> int:
        """Run ``args`` in the running task; its exit code (0 once it runs, ``detach``).

        The process inherits the task's spec process (env, user, cwd,
        capabilities) with ``env`` entries added and ``cwd``/``user`` replaced.
        ``terminal``: runc gives it a pseudo-terminal joined to the caller's
        (``console_size`` rows and columns from its start). A command the task's
        rootfs does not have is refused first, as a start refuses it
        (:func:`check_command`).
        """
        if not args:
            raise InvalidArgument("exec needs a command")
        bundle = self.bundles.require(task_id)
        info = self.launcher.info(task_id)
        if info.status != TaskStatus.RUNNING:
            raise FailedPrecondition(f"task {task_id} is {info.status}, not running")
        config = read_json(bundle / "config.json") or {}
        process = copy.deepcopy(config.get("process") or {})
        process["args"] = list(args)
        process["env"] = _merge_env(list(process.get("env") or []), list(env))
        process["terminal"] = terminal
        if cwd is not None:
            if not cwd.startswith("/"):
                raise InvalidArgument(f"cwd must be absolute: {cwd!r}")
            process["cwd"] = cwd
        if user is not None:
            process["user"] = resolve_user(user, bundle / "rootfs").to_spec()
        if terminal and console_size is not None:
            rows, cols = console_size
            process["consoleSize"] = {"height": rows, "width": cols}
        check_command({"process": process, "mounts": config.get("mounts") or []},
                      bundle / "rootfs")
        return self.launcher.exec(task_id, bundle, process, detach=detach, stdio=stdio,
                                  timeout=timeout)

    def delete(self, task_id: str, *, force: bool = False) -> TaskInfo:
        """Remove a stopped task: runc's state, the rootfs mounts, the bundle.

        ``force`` kills a task that is still running (or paused) first; without
        it, deleting a live task is a :class:`FailedPrecondition`. Returns the
        task's last state (with its exit code, when known).
        """
        validate_id(task_id)
        with self.bundles.lock(task_id):
            bundle = self.bundles.require(task_id)
            info = self.launcher.info(task_id)
            if info.status != TaskStatus.STOPPED and not force:
                raise FailedPrecondition(
                    f"task {task_id} is {info.status}; kill it first or delete with force"
                )
            with contextlib.suppress(NotFound):
                self.runc.delete(task_id, force=True)
            if not self.launcher.wait_shim(bundle, 10.0):
                pid = self.launcher.shim_pid(bundle)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, _signal.SIGKILL)
                    self.launcher.wait_shim(bundle, 5.0)
            final = self.launcher.info(task_id, query=False)
            self.launcher.forget(task_id)
            self.bundles.remove(bundle)
            return final

    # -- checkpoint / restore (see criu.py) -----------------------------------------

    def checkpoint(
        self,
        task_id: str,
        image_dir: str | os.PathLike[str],
        *,
        leave_running: bool = False,
        work_dir: str | os.PathLike[str] | None = None,
        tcp_established: bool = True,
        ext_unix_sk: bool = True,
        file_locks: bool = True,
        settle: Callable[[float], None] = time.sleep,
    ) -> criu.CheckpointInfo:
        """Checkpoint the task with CRIU; see :func:`lamina.containers.runtime.criu.checkpoint`."""
        return criu.checkpoint(
            self.launcher,
            task_id,
            Path(image_dir),
            leave_running=leave_running,
            work_dir=None if work_dir is None else Path(work_dir),
            tcp_established=tcp_established,
            ext_unix_sk=ext_unix_sk,
            file_locks=file_locks,
            settle=settle,
        )

    def restore(
        self,
        task_id: str,
        image_dir: str | os.PathLike[str],
        *,
        mounts: Sequence[Mount] | None = None,
        spec: dict[str, Any] | None = None,
        detach: bool = True,
        work_dir: str | os.PathLike[str] | None = None,
        stdio: Stdio = INHERIT_STDIO,
    ) -> TaskInfo:
        """Restore a checkpoint; see :func:`lamina.containers.runtime.criu.restore`."""
        return criu.restore(
            self.launcher,
            task_id,
            Path(image_dir),
            mounts=mounts,
            spec=spec,
            detach=detach,
            work_dir=None if work_dir is None else Path(work_dir),
            stdio=stdio,
        )

    def close(self) -> None:
        """Reap monitors this process started that have exited (they keep running)."""
        self.launcher.reap()
