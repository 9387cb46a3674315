"""Running runc in a bundle, and finding out what became of it.

A foreground task runs ``runc run`` (or ``runc restore``) as a child of the
caller with the caller's stdio and returns its exit code, as ``runc exec`` of a
process in a running task does. A detached task is
run by a small monitor process (the shim, ``shim.py``) in a session of its
own: it survives the lamina process, keeps the container's output in
``output.log`` (or the log ``meta.json`` names), bounded, and records the exit
code in ``exit.json``.

Either way runc writes the container init's pid to ``runc.pid`` once the
container runs, so "runc ended and there is no pid file" means it failed to
start; the reason is the last error in ``runc.log``. A task's state is then
read from runc when runc still knows it, else from the bundle's files (see
:mod:`.bundle` for the layout).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal as _signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.errors import LaminaError, NotFound, Unavailable
from lamina.fs.files import atomic_write
from lamina.util.signals import Terminated

from .bundle import (
    OUTPUT_MAX,
    Bundles,
    TaskInfo,
    TaskStatus,
    output_log,
    read_json,
    read_pid,
    write_json,
)
from .runc import Runc, error_from_message

__all__ = ["INHERIT_STDIO", "START_TIMEOUT", "Launcher", "Stdio", "runc_log_error"]

_SHIM = Path(__file__).with_name("shim.py")
START_TIMEOUT = 60.0
"""Seconds a detached start (or restore) may take until runc reports the pid."""


@dataclass(frozen=True)
class Stdio:
    """The standard streams of a process run in the foreground (containerd's
    ``cio.Streams``): file descriptors or ``subprocess.DEVNULL``; None inherits
    the caller's own."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` with these streams."""
        return subprocess.Popen(argv, stdin=self.stdin, stdout=self.stdout, stderr=self.stderr)


INHERIT_STDIO = Stdio()
"""The caller's own standard streams."""


def runc_log_error(log: Path, what: str, fallback: str) -> LaminaError:
    """The error for ``what`` from the last error line of runc's JSON ``log``."""
    message = ""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        lines = ""
    for line in reversed(lines.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("level") in ("error", "fatal"):
            message = str(obj.get("msg", ""))
            break
    return error_from_message(message or fallback, what)


def _stop_after(proc: subprocess.Popen[bytes], exc: BaseException,
                kill: Callable[[], None]) -> None:
    """The command was interrupted while runc ran in the foreground: the terminal
    signalled runc too, and runc passes it on; a SIGTERM or SIGHUP sent to lamina
    alone is passed on to runc here. The process gets a moment to end, then
    ``kill`` makes sure it has."""
    if isinstance(exc, Terminated):
        with contextlib.suppress(OSError):
            proc.send_signal(exc.signum)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(LaminaError):
            kill()
        proc.wait()


def _kill_pid(pid_file: Path) -> None:
    """SIGKILL the process whose pid ``pid_file`` holds, if any."""
    pid = read_pid(pid_file)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, _signal.SIGKILL)


class Launcher:
    """Starts runc in the bundles of ``bundles`` and reports on the tasks."""

    def __init__(self, bundles: Bundles, runc: Runc) -> None:
        self.bundles = bundles
        self.runc = runc
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- starting ----------------------------------------------------------------------

    def foreground(
        self,
        task_id: str,
        bundle: Path,
        runc_args: Sequence[str],
        *,
        stdio: Stdio,
        what: str = "",
    ) -> TaskInfo:
        """Run ``runc <runc_args>`` with ``stdio`` until it ends; the final state."""
        what = what or f"start task {task_id}"
        proc = stdio.popen(self.runc.argv(*runc_args, log=bundle / "runc.log"))
        try:
            code = proc.wait()
        except (KeyboardInterrupt, Terminated) as exc:
            _stop_after(proc, exc, lambda: self.runc.kill(task_id, _signal.SIGKILL,
                                                          all_processes=True))
            raise
        if code < 0:
            code = 128 - code
        if read_pid(bundle / "runc.pid") is None:
            raise runc_log_error(bundle / "runc.log", what, f"runc exited with {code}")
        write_json(bundle / "exit.json", {"exit_code": code, "exited_at": time.time()})
        return self.info(task_id)

    def detached(
        self, task_id: str, bundle: Path, runc_args: Sequence[str], *, what: str = ""
    ) -> TaskInfo:
        """Run ``runc <runc_args>`` under a shim; the state once the container runs."""
        what = what or f"start task {task_id}"
        for name in ("exit.json", "runc.pid"):
            with contextlib.suppress(FileNotFoundError):
                (bundle / name).unlink()
        write_json(
            bundle / "shim.json",
            {
                "argv": self.runc.argv(*runc_args, log=bundle / "runc.log"),
                "output": str(output_log(bundle)),
                "output_max": OUTPUT_MAX,
                "exit_file": str(bundle / "exit.json"),
            },
        )
        with open(os.open(bundle / "shim.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND
                          | os.O_CLOEXEC, 0o600), "ab") as log:
            shim = subprocess.Popen(
                [sys.executable, "-I", str(_SHIM), str(bundle / "shim.json")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=bundle,
                start_new_session=True,
                close_fds=True,
            )
        self._children[task_id] = shim
        atomic_write(bundle / "shim.pid", f"{shim.pid}\n".encode())
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            # look for the end first: runc writes the pid file before the
            # shim can write exit.json, so "ended and no pid" means it failed
            ended = shim.poll() is not None or (bundle / "exit.json").exists()
            if read_pid(bundle / "runc.pid") is not None:
                return self.info(task_id)
            if ended:
                raise runc_log_error(bundle / "runc.log", what, "runc failed to start")
            if time.monotonic() > deadline:
                raise Unavailable(f"{what}: runc did not start within {START_TIMEOUT}s")
            time.sleep(0.01)

    def exec(self, task_id: str, bundle: Path, process: dict[str, Any], *,
             stdio: Stdio, timeout: float | None, detach: bool = False) -> int:
        """Run ``process`` (a runtime-spec process) in running task ``task_id`` with
        ``stdio``; its exit code (128+N when killed by signal N), or 0 once it
        runs when ``detach``. Its files live in ``bundle`` while runc runs; past
        ``timeout`` it is killed."""
        tag = os.urandom(6).hex()  # random as uuid4, without uuid's import of platform
        process_file = bundle / f"exec-{tag}.json"
        pid_file = bundle / f"exec-{tag}.pid"
        log_file = bundle / f"exec-{tag}.log"
        write_json(process_file, process)
        argv = self.runc.argv("exec", *(["--detach"] if detach else []), "--process",
                              str(process_file), "--pid-file", str(pid_file), task_id,
                              log=log_file)
        try:
            proc = stdio.popen(argv)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                _kill_pid(pid_file)
                proc.wait()
                raise Unavailable(f"exec in {task_id}: timed out after {timeout}s") from exc
            except (KeyboardInterrupt, Terminated) as exc:
                _stop_after(proc, exc, lambda: _kill_pid(pid_file))
                raise
            if code < 0:
                code = 128 - code
            if read_pid(pid_file) is None and code != 0:
                raise runc_log_error(log_file, f"exec in {task_id}", f"runc exec exited {code}")
            return code
        finally:
            for p in (process_file, pid_file, log_file):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def cleanup_failed(self, task_id: str, bundle: Path) -> None:
        """Undo a start (or restore) that failed: runc's state, the shim, the bundle."""
        with contextlib.suppress(LaminaError):
            self.runc.delete(task_id, force=True)
        if not self.wait_shim(bundle, 10.0):
            pid = self.shim_pid(bundle)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, _signal.SIGKILL)
        self.bundles.remove(bundle)

    # -- the shim ------------------------------------------------------------------------

    def shim_pid(self, bundle: Path) -> int | None:
        """The pid of the bundle's shim if it is still alive."""
        task_id = bundle.name
        child = self._children.get(task_id)
        if child is not None and child.poll() is not None:
            del self._children[task_id]
        pid = read_pid(bundle / "shim.pid")
        if pid is None:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if str(bundle / "shim.json").encode() not in cmdline:
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if stat.rpartition(")")[2].split()[0] == "Z":
            return None
        return pid

    def wait_shim(self, bundle: Path, timeout: float) -> bool:
        """Wait until the bundle's shim has gone; False if it is still there after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.shim_pid(bundle) is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def forget(self, task_id: str) -> None:
        """Drop (and reap, if it has ended) the shim this process started for ``task_id``."""
        child = self._children.pop(task_id, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)

    def reap(self) -> None:
        """Reap shims this process started that have exited (the others keep running)."""
        for task_id, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[task_id]

    # -- observing -----------------------------------------------------------------------

    def info(
        self, task_id: str, runc_state: dict[str, Any] | None = None, *, query: bool = True
    ) -> TaskInfo:
        """The task's state: runc's (``runc_state``, or asked of runc unless not
        ``query``) where runc knows the task, else what its bundle's files say."""
        bundle = self.bundles.require(task_id)
        meta = read_json(bundle / "meta.json") or {}
        if runc_state is None and query:
            try:
                runc_state = self.runc.state(task_id)
            except NotFound:
                runc_state = None
        exit_info = read_json(bundle / "exit.json")
        exit_code = exit_info.get("exit_code") if exit_info else None
        pid: int | None = None
        if runc_state is not None:
            status = TaskStatus(str(runc_state.get("status", "stopped")))
            raw_pid = int(runc_state.get("pid") or 0)
            pid = raw_pid if raw_pid > 0 and status != TaskStatus.STOPPED else None
        elif exit_info is None and self.shim_pid(bundle) is not None:
            status = TaskStatus.CREATED
            pid = read_pid(bundle / "runc.pid")
        else:
            status = TaskStatus.STOPPED
        if status != TaskStatus.STOPPED:
            exit_code = None
        return TaskInfo(
            id=task_id,
            status=status,
            pid=pid,
            exit_code=int(exit_code) if isinstance(exit_code, int) else None,
            bundle=bundle,
            detached=bool(meta.get("detached", False)),
            created=meta.get("created"),
            output=output_log(bundle, meta),
        )
