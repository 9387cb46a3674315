"""Tasks: processes of containers, run by runc out of per-container bundles.

A :class:`TaskManager` owns one state directory::

    <state_dir>/runc/            runc's own state (``runc --root``), nobody else's
    <state_dir>/<id>/            the task's OCI bundle
        config.json              the runtime spec
        rootfs/                  the snapshot's mounts, mounted before runc starts
        meta.json                what lamina needs to know later (mounts, mode, times)
        runc.pid                 the container init's host pid (runc --pid-file)
        runc.log                 runc's own log (JSON lines)
        output.log               stdout + stderr of a detached task
        exit.json                exit code, once runc has reported it
        shim.json, shim.pid      the monitor of a detached task (see ``shim.py``)
    <state_dir>/.locks/<id>.lock serialises start/restore/delete of one id

Everything a later, unrelated lamina process needs is in those files and in
runc's state, so tasks started by one process are listed, signalled, paused,
checkpointed and deleted by another.

A foreground task runs ``runc run`` as a child of the caller with the caller's
stdio and returns its exit code. A detached task is run by a small monitor
process (the shim) in a session of its own: it survives the lamina process,
keeps the container's output in ``output.log`` and records the exit code.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import enum
import hashlib
import json
import os
import re
import signal as _signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LaminaError,
    NotFound,
    Unavailable,
)
from lamina.fsutil import atomic_write, locked, remove_tree
from lamina.mount import Mount, is_mountpoint, mount_all, unmount_all

from .runc import Runc, error_from_message, parse_signal
from .spec import resolve_user

if TYPE_CHECKING:
    from .criu import CheckpointInfo

__all__ = ["Task", "TaskInfo", "TaskManager", "TaskStatus", "validate_id"]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_RESERVED = {"runc"}
_SHIM = Path(__file__).with_name("shim.py")
_START_TIMEOUT = 60.0


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

    @property
    def output_path(self) -> Path:
        """Where a detached task's stdout and stderr go."""
        return self.bundle / "output.log"


Task = TaskInfo
"""What :meth:`TaskManager.start` returns: the task's state right after starting."""


def validate_id(task_id: str) -> str:
    """``task_id`` if it is usable as a runc id and a directory name."""
    if not isinstance(task_id, str) or not _ID_RE.match(task_id) or task_id in _RESERVED:
        raise InvalidArgument(
            f"invalid task id {task_id!r}: use 1-128 of [A-Za-z0-9_.+-], "
            "starting with a letter or digit (not 'runc')"
        )
    return task_id


def _mount_to_json(m: Mount) -> dict[str, Any]:
    return {"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)}


def _mount_from_json(obj: dict[str, Any]) -> Mount:
    return Mount(
        type=str(obj["type"]),
        source=str(obj["source"]),
        target=str(obj.get("target", "")),
        options=tuple(str(o) for o in obj.get("options", ())),
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")


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
        self.state_dir = Path(state_dir).absolute()
        # owner-only like the rest of a root: runc runs as root, and a container's
        # processes see only its rootfs mount, never these directories
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.state_dir / ".locks").mkdir(mode=0o700, exist_ok=True)
        self.runc = Runc(self.state_dir / "runc", binary=runc_binary)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        tag = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:8]
        self._cgroup_prefix = f"lamina/{tag}-"

    # -- paths ---------------------------------------------------------------

    def bundle(self, task_id: str) -> Path:
        """The bundle directory of ``task_id`` (whether or not it exists)."""
        return self.state_dir / validate_id(task_id)

    def rootfs(self, task_id: str) -> Path:
        return self.bundle(task_id) / "rootfs"

    def output_path(self, task_id: str) -> Path:
        return self.bundle(task_id) / "output.log"

    def _lock(self, task_id: str) -> contextlib.AbstractContextManager[None]:
        return locked(self.state_dir / ".locks" / f"{task_id}.lock")

    def _require(self, task_id: str) -> Path:
        bundle = self.bundle(task_id)
        if not (bundle / "meta.json").exists():
            raise NotFound(f"task {task_id!r} not found")
        return bundle

    def cgroups_path(self, task_id: str) -> str:
        """The (runc-relative) cgroup a task gets when its spec names none."""
        return self._cgroup_prefix + task_id

    # -- bundle life cycle -----------------------------------------------------

    def _create_bundle(
        self,
        task_id: str,
        mounts: Sequence[Mount],
        spec: dict[str, Any],
        *,
        detached: bool,
        extra_meta: dict[str, Any] | None = None,
    ) -> Path:
        bundle = self.bundle(task_id)
        if (bundle / "meta.json").exists():
            raise AlreadyExists(f"task {task_id!r} already exists")
        if bundle.exists():
            # left by a start that died before writing meta.json: nothing was
            # launched from it (runc only runs after that), so it can go
            self._remove_bundle(bundle)
        if not mounts:
            raise InvalidArgument("a task needs at least one rootfs mount")
        if not isinstance(spec.get("process"), dict) or not spec["process"].get("args"):
            raise InvalidArgument("spec has no process args")
        if detached and spec["process"].get("terminal"):
            raise InvalidArgument("a detached task cannot have a terminal")
        config = copy.deepcopy(spec)
        config.setdefault("root", {})["path"] = "rootfs"
        linux = config.setdefault("linux", {})
        if not linux.get("cgroupsPath"):
            linux["cgroupsPath"] = self.cgroups_path(task_id)
        bundle.mkdir(mode=0o700)
        try:
            rootfs = bundle / "rootfs"
            rootfs.mkdir(mode=0o700)  # covered by the container's root filesystem
            _write_json(bundle / "config.json", config)
            # as containerd's shim: the snapshotter's mounts exactly as given (setuid
            # binaries and devices of the image work inside the container)
            mount_all(mounts, rootfs, allow_suid=True, allow_dev=True)
            meta = {
                "id": task_id,
                "created": time.time(),
                "detached": detached,
                "mounts": [_mount_to_json(m) for m in mounts],
            }
            meta.update(extra_meta or {})
            _write_json(bundle / "meta.json", meta)
        except BaseException:
            self._remove_bundle(bundle)
            raise
        return bundle

    def _remove_bundle(self, bundle: Path) -> None:
        rootfs = bundle / "rootfs"
        if rootfs.exists():
            unmount_all(rootfs)
            if is_mountpoint(rootfs):
                raise Internal(f"{rootfs} is still mounted; not removing the bundle")
        remove_tree(bundle)

    # -- launching ---------------------------------------------------------------

    def _runc_error(self, bundle: Path, what: str, fallback: str) -> LaminaError:
        message = ""
        try:
            lines = (bundle / "runc.log").read_text(encoding="utf-8", errors="replace")
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

    def _launch_foreground(
        self,
        task_id: str,
        bundle: Path,
        runc_args: Sequence[str],
        *,
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
        what: str = "",
    ) -> TaskInfo:
        what = what or f"start task {task_id}"
        argv = self.runc.argv(*runc_args, log=bundle / "runc.log")
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # The terminal signalled runc too, and runc passes it on; give the
            # container a moment, then make sure it is gone.
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(LaminaError):
                    self.runc.kill(task_id, _signal.SIGKILL, all_processes=True)
                proc.wait()
            raise
        if code < 0:
            code = 128 - code
        if _read_pid(bundle / "runc.pid") is None:
            raise self._runc_error(bundle, what, f"runc exited with {code}")
        _write_json(bundle / "exit.json", {"exit_code": code, "exited_at": time.time()})
        return self._info(task_id, None)

    def _launch_detached(
        self, task_id: str, bundle: Path, runc_args: Sequence[str], *, what: str = ""
    ) -> TaskInfo:
        what = what or f"start task {task_id}"
        for name in ("exit.json", "runc.pid"):
            with contextlib.suppress(FileNotFoundError):
                (bundle / name).unlink()
        _write_json(
            bundle / "shim.json",
            {
                "argv": self.runc.argv(*runc_args, log=bundle / "runc.log"),
                "output": str(bundle / "output.log"),
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
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            # look for the end first: runc writes the pid file before the
            # shim can write exit.json, so "ended and no pid" means it failed
            ended = shim.poll() is not None or (bundle / "exit.json").exists()
            if _read_pid(bundle / "runc.pid") is not None:
                return self._info(task_id, None)
            if ended:
                raise self._runc_error(bundle, what, "runc failed to start")
            if time.monotonic() > deadline:
                raise Unavailable(f"{what}: runc did not start within {_START_TIMEOUT}s")
            time.sleep(0.01)

    def _shim_pid(self, bundle: Path) -> int | None:
        """The pid of the bundle's shim if it is still alive."""
        task_id = bundle.name
        child = self._children.get(task_id)
        if child is not None and child.poll() is not None:
            del self._children[task_id]
        pid = _read_pid(bundle / "shim.pid")
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

    def _wait_shim(self, bundle: Path, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._shim_pid(bundle) is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    # -- public operations ---------------------------------------------------------

    def start(
        self,
        task_id: str,
        mounts: Sequence[Mount],
        spec: dict[str, Any],
        *,
        detach: bool,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> TaskInfo:
        """Mount ``mounts`` as the rootfs of a new bundle and run ``spec`` in it.

        Foreground (``detach=False``): the process gets ``stdin``/``stdout``/
        ``stderr`` (file descriptors; None inherits the caller's, or
        ``subprocess.DEVNULL``), the call returns when it exits and the result
        carries its ``exit_code`` (128+N when killed by signal N). Detached: the
        output goes to ``output.log`` in the bundle, the call returns once the
        process runs, with its ``pid``. Either way the task stays (stopped, once
        its process has exited) until :meth:`delete`.
        """
        validate_id(task_id)
        with self._lock(task_id):
            bundle = self._create_bundle(task_id, mounts, spec, detached=detach)
            args = ["run", "--bundle", str(bundle), "--pid-file", str(bundle / "runc.pid"), task_id]
            try:
                if detach:
                    return self._launch_detached(task_id, bundle, args)
                return self._launch_foreground(
                    task_id, bundle, args, stdin=stdin, stdout=stdout, stderr=stderr
                )
            except LaminaError:
                self._cleanup_failed(task_id, bundle)
                raise

    def _cleanup_failed(self, task_id: str, bundle: Path) -> None:
        with contextlib.suppress(LaminaError):
            self.runc.delete(task_id, force=True)
        if not self._wait_shim(bundle, 10.0):
            pid = self._shim_pid(bundle)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, _signal.SIGKILL)
        self._remove_bundle(bundle)

    def _info(
        self, task_id: str, runc_state: dict[str, Any] | None, *, query: bool = True
    ) -> TaskInfo:
        bundle = self._require(task_id)
        meta = _read_json(bundle / "meta.json") or {}
        if runc_state is None and query:
            try:
                runc_state = self.runc.state(task_id)
            except NotFound:
                runc_state = None
        exit_info = _read_json(bundle / "exit.json")
        exit_code = exit_info.get("exit_code") if exit_info else None
        pid: int | None = None
        if runc_state is not None:
            status = TaskStatus(str(runc_state.get("status", "stopped")))
            raw_pid = int(runc_state.get("pid") or 0)
            pid = raw_pid if raw_pid > 0 and status != TaskStatus.STOPPED else None
        elif exit_info is None and self._shim_pid(bundle) is not None:
            status = TaskStatus.CREATED
            pid = _read_pid(bundle / "runc.pid")
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
        )

    def state(self, task_id: str) -> TaskInfo:
        """The task's status (created, running, paused, stopped), pid and exit code."""
        return self._info(task_id, None)

    def list(self) -> builtins.list[TaskInfo]:
        """Every task in the state directory, by id."""
        states = {str(s.get("id")): s for s in self.runc.list()}
        out: list[TaskInfo] = []
        for entry in sorted(self.state_dir.iterdir()):
            if entry.name in _RESERVED or not _ID_RE.match(entry.name):
                continue
            if not (entry / "meta.json").exists():
                continue
            with contextlib.suppress(NotFound):
                out.append(self._info(entry.name, states.get(entry.name), query=False))
        return out

    def wait(self, task_id: str, timeout: float | None = None) -> int | None:
        """Block until the task stops; its exit code (None if nobody saw it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bundle = self._require(task_id)
        while True:
            info = self._info(task_id, None)
            if info.status == TaskStatus.STOPPED:
                # the shim writes the exit code right after runc returns
                if info.exit_code is None and self._wait_shim(bundle, 5.0):
                    info = self._info(task_id, None)
                return info.exit_code
            if deadline is not None and time.monotonic() > deadline:
                raise Unavailable(f"task {task_id} still {info.status} after {timeout}s")
            time.sleep(0.05)

    def kill(self, task_id: str, signal: int | str = _signal.SIGTERM, *, all: bool = False) -> None:
        """Send ``signal`` to the task's init (``all``: to every process in it)."""
        sig = parse_signal(signal)
        self._require(task_id)
        try:
            self.runc.kill(task_id, sig, all_processes=all)
        except NotFound as exc:
            raise FailedPrecondition(f"task {task_id} is not running") from exc

    def pause(self, task_id: str) -> None:
        """Freeze every process of the task."""
        self._require(task_id)
        try:
            self.runc.pause(task_id)
        except NotFound as exc:
            raise FailedPrecondition(f"task {task_id} is not running") from exc

    def resume(self, task_id: str) -> None:
        """Thaw a paused task."""
        self._require(task_id)
        try:
            self.runc.resume(task_id)
        except NotFound as exc:
            raise FailedPrecondition(f"task {task_id} is not paused") from exc

    def ps(self, task_id: str) -> builtins.list[int]:
        """Host pids of the task's processes (empty once it stopped)."""
        self._require(task_id)
        try:
            return self.runc.ps(task_id)
        except (NotFound, FailedPrecondition):
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
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Run ``args`` in the running task; its exit code.

        The process inherits the task's spec process (env, user, cwd,
        capabilities) with ``env`` entries added and ``cwd``/``user`` replaced.
        """
        if not args:
            raise InvalidArgument("exec needs a command")
        bundle = self._require(task_id)
        info = self._info(task_id, None)
        if info.status != TaskStatus.RUNNING:
            raise FailedPrecondition(f"task {task_id} is {info.status}, not running")
        config = _read_json(bundle / "config.json") or {}
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
        tag = uuid.uuid4().hex[:12]
        process_file = bundle / f"exec-{tag}.json"
        pid_file = bundle / f"exec-{tag}.pid"
        log_file = bundle / f"exec-{tag}.log"
        _write_json(process_file, process)
        argv = self.runc.argv(
            "exec",
            "--process",
            str(process_file),
            "--pid-file",
            str(pid_file),
            task_id,
            log=log_file,
        )
        try:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                pid = _read_pid(pid_file)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, _signal.SIGKILL)
                proc.wait()
                raise Unavailable(f"exec in {task_id}: timed out after {timeout}s") from exc
            if code < 0:
                code = 128 - code
            if _read_pid(pid_file) is None and code != 0:
                message = ""
                with contextlib.suppress(FileNotFoundError):
                    for line in reversed(log_file.read_text(errors="replace").splitlines()):
                        with contextlib.suppress(ValueError):
                            obj = json.loads(line)
                            if obj.get("level") in ("error", "fatal"):
                                message = str(obj.get("msg", ""))
                                break
                raise error_from_message(
                    message or f"runc exec exited {code}", f"exec in {task_id}"
                )
            return code
        finally:
            for p in (process_file, pid_file, log_file):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def delete(self, task_id: str, *, force: bool = False) -> TaskInfo:
        """Remove a stopped task: runc's state, the rootfs mounts, the bundle.

        ``force`` kills a task that is still running (or paused) first; without
        it, deleting a live task is a :class:`FailedPrecondition`. Returns the
        task's last state (with its exit code, when known).
        """
        validate_id(task_id)
        with self._lock(task_id):
            bundle = self._require(task_id)
            info = self._info(task_id, None)
            if info.status != TaskStatus.STOPPED and not force:
                raise FailedPrecondition(
                    f"task {task_id} is {info.status}; kill it first or delete with force"
                )
            with contextlib.suppress(NotFound):
                self.runc.delete(task_id, force=True)
            if not self._wait_shim(bundle, 10.0):
                pid = self._shim_pid(bundle)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, _signal.SIGKILL)
                    self._wait_shim(bundle, 5.0)
            final = self._info(task_id, None, query=False)
            child = self._children.pop(task_id, None)
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=1.0)
            self._remove_bundle(bundle)
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
    ) -> CheckpointInfo:
        """Checkpoint the task with CRIU; see :func:`lamina.containers.runtime.criu.checkpoint`."""
        from .criu import checkpoint

        return checkpoint(
            self,
            task_id,
            Path(image_dir),
            leave_running=leave_running,
            work_dir=None if work_dir is None else Path(work_dir),
            tcp_established=tcp_established,
            ext_unix_sk=ext_unix_sk,
            file_locks=file_locks,
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
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> TaskInfo:
        """Restore a checkpoint; see :func:`lamina.containers.runtime.criu.restore`."""
        from .criu import restore

        return restore(
            self,
            task_id,
            Path(image_dir),
            mounts=mounts,
            spec=spec,
            detach=detach,
            work_dir=None if work_dir is None else Path(work_dir),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )

    def close(self) -> None:
        """Reap monitors this process started that have exited (they keep running)."""
        for task_id, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[task_id]
