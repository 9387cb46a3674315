"""Checkpoint and restore of tasks with CRIU, through runc.

``runc checkpoint`` dumps the container's process tree (and its namespaces)
into an image directory; ``runc restore`` recreates it from there in a bundle
whose rootfs is mounted again, at the same or another path. A restored
process carries on where it was stopped: its memory, open files and
counters are those of the dump.

The restored task is run by the same monitor (shim) as a detached start:
``runc restore`` stays in the foreground inside it, so its exit code is
recorded and its output lands in ``output.log``. The container's stdio are
pipes, which runc marks external at dump time and re-plugs at restore time.

Next to CRIU's own files the image directory holds ``lamina-checkpoint.json``:
the spec, the rootfs mounts and the CRIU options of the dump, so that a
checkpoint can be restored later by another process without the caller
supplying them again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina import rootless
from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LaminaError,
    NotFound,
    Unavailable,
    printable,
)
from lamina.fs.files import read_regular_file
from lamina.mounts.mount import Mount, is_mountpoint

from .bundle import (
    TaskInfo,
    TaskStatus,
    mount_from_json,
    mount_rootfs,
    mount_to_json,
    validate_id,
    write_json,
)
from .launch import INHERIT_STDIO, Launcher, Stdio

__all__ = ["CheckpointInfo", "checkpoint", "criu_available", "find_criu", "restore"]

METADATA = "lamina-checkpoint.json"

_check_cache: dict[tuple[str, float], tuple[bool, str]] = {}


@dataclass(frozen=True)
class CheckpointInfo:
    """A finished checkpoint: where it is and how long the dump took."""

    task_id: str
    image_dir: Path
    seconds: float
    leave_running: bool
    options: tuple[str, ...]


def find_criu() -> str | None:
    """The ``criu`` runc will run: the first one in ``$PATH``."""
    return shutil.which("criu", path=os.environ.get("PATH", os.defpath))


def criu_available() -> tuple[bool, str]:
    """Whether checkpoint/restore can work here, and why not.

    Runs ``criu check`` with the binary runc finds first in ``$PATH``. The
    reason names the binary and version when all is well. A good answer is
    cached per binary; a bad one is not (it may be passing).

    ``criu check`` reads the host's mountinfo, and CRIU cannot parse a line
    longer than its buffer (an overlay with hundreds of ``lowerdir+=`` layers
    mounted on the host, say). That failure says nothing about the
    containers, whose mount namespaces are dumped on their own, so it is
    reported as available, with the caveat in the reason.
    """
    path = find_criu()
    if path is None:
        elsewhere = [p for p in ("/usr/local/sbin/criu", "/usr/sbin/criu") if os.path.exists(p)]
        if elsewhere:
            return False, f"criu is at {elsewhere[0]} but not in $PATH (runc looks it up there)"
        return False, "criu is not installed (no `criu` in $PATH)"
    if os.geteuid() != 0:
        return False, "checkpoint/restore needs root"
    try:
        key = (path, os.stat(path).st_mtime)
    except OSError as exc:
        return False, f"{path}: {exc}"
    if key in _check_cache:
        return _check_cache[key]
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.splitlines()
        proc = subprocess.run(
            [path, "check"], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{path}: cannot run `criu check`: {exc}"
    output = (proc.stdout + proc.stderr).strip()
    ver = version[0].strip() if version else "unknown version"
    if proc.returncode == 0 and "Looks good" in output:
        result = (True, f"{path} ({ver}): Looks good.")
        _check_cache[key] = result
        return result
    errors = [ln for ln in output.splitlines() if "Error" in ln]
    if errors and all("mountinfo" in ln for ln in errors):
        return True, (
            f"{path} ({ver}): `criu check` could not parse the host's mountinfo "
            "(a mount with very long options is present); not a container problem"
        )
    tail = " | ".join(ln[:300] for ln in output.splitlines()[-3:]) or f"exit {proc.returncode}"
    return False, f"{path} ({ver}): `criu check` failed: {tail}"


def _require_criu() -> None:
    """Fail early when CRIU cannot be run at all; CRIU itself reports the rest."""
    if find_criu() is None:
        raise Unavailable("checkpoint/restore unavailable: criu is not installed")
    if os.geteuid() != 0:
        raise Unavailable("checkpoint/restore unavailable: it needs root")


def _criu_log_tail(*logs: Path) -> str:
    for log in logs:
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        errors = [ln.strip()[:300] for ln in lines if "Error" in ln]
        if errors:
            return f" (criu {log}: {' | '.join(errors[-3:])})"
    return ""


# CRIU lines that mark a failure to stop the tasks, not to dump them: under load a
# task can still sit in the freezer (state D) when CRIU, having thawed the cgroup,
# waits for it to trap; nothing was dumped and the task runs on, so it is retried.
SEIZE_FAILURES = ("Unseizable non-zombie", "zombie found while seizing",
                  "Unable to freeze", "Unable to seize")
DUMP_ATTEMPTS = 4


def seize_failed(log: Path) -> bool:
    """Whether CRIU's ``log`` shows a dump that failed while stopping the tasks."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return False
    return any(marker in text for marker in SEIZE_FAILURES)


def _options(*, tcp_established: bool, ext_unix_sk: bool, file_locks: bool) -> tuple[str, ...]:
    opts: list[str] = []
    if tcp_established:
        opts.append("--tcp-established")
    if ext_unix_sk:
        opts.append("--ext-unix-sk")
    if file_locks:
        opts.append("--file-locks")
    return tuple(opts)


#: the runc restore flags a checkpoint's metadata may ask for: those a dump records
_RESTORE_FLAGS = _options(tcp_established=True, ext_unix_sk=True, file_locks=True)


def _saved(image_dir: Path) -> dict[str, Any]:
    """The record written with the dump in ``image_dir`` ({} when there is none).
    The images may come from a registry: it is read only if it is a small regular
    file, and the runc restore flags it names are checked (:func:`_restore_flags`)."""
    raw = read_regular_file(image_dir / METADATA, limit=16 << 20,
                            what=f"checkpoint metadata {METADATA}")
    try:
        saved = json.loads(raw) if raw is not None else {}
    except ValueError:
        saved = {}
    return saved if isinstance(saved, dict) else {}


def _restore_flags(saved: dict[str, Any]) -> list[str]:
    """The runc restore flags the dump recorded (all of :data:`_RESTORE_FLAGS` when
    none are): one lamina does not record (``--pid-file`` or ``--work-path`` would
    have runc write host paths) is InvalidArgument."""
    options = saved.get("options", list(_RESTORE_FLAGS))
    if not isinstance(options, list) or not all(o in _RESTORE_FLAGS for o in options):
        raise InvalidArgument(f"checkpoint metadata asks runc restore for options "
                              f"{printable(repr(options))[:200]}; only "
                              f"{', '.join(_RESTORE_FLAGS)} are honoured")
    return [str(o) for o in options]


def checkpoint(
    launcher: Launcher,
    task_id: str,
    image_dir: Path,
    *,
    leave_running: bool = False,
    work_dir: Path | None = None,
    tcp_established: bool = True,
    ext_unix_sk: bool = True,
    file_locks: bool = True,
    settle: Callable[[float], None] = time.sleep,
) -> CheckpointInfo:
    """Dump the running (or paused) task into ``image_dir``.

    Without ``leave_running`` the task is stopped by the dump (its state
    becomes ``stopped``; the bundle stays until deleted or restored into).
    ``work_dir`` receives CRIU's logs (default: ``image_dir``). TCP
    connections, external unix sockets and file locks are dumped when the
    matching flags are on; restore uses the same options.

    A dump that failed while stopping the tasks is tried again after
    ``settle(seconds)``, which waits for the task to leave the state CRIU could
    not seize. A caller that holds the task paused passes one that lets it run
    meanwhile: kept in the freezer between attempts, such a task failed all four.
    """
    rootless.refuse("CRIU checkpoint", rootless.CRIU_ROOTLESS)
    live = (TaskStatus.RUNNING, TaskStatus.PAUSED)
    bundle = launcher.bundles.path(task_id)
    info = launcher.info(task_id)
    if info.status not in live:
        raise FailedPrecondition(f"task {task_id} is {info.status}; only a live task can be dumped")
    _require_criu()
    image_dir = image_dir.absolute()
    if (image_dir / "inventory.img").exists():
        raise AlreadyExists(f"{image_dir} already holds a checkpoint")
    image_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if work_dir is not None:
        work_dir = work_dir.absolute()
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    opts = _options(tcp_established=tcp_established, ext_unix_sk=ext_unix_sk, file_locks=file_locks)
    log = (work_dir or image_dir) / "dump.log"
    started = time.monotonic()
    for attempt in range(1, DUMP_ATTEMPTS + 1):
        try:
            launcher.runc.checkpoint(
                task_id, image_dir, work_path=work_dir, leave_running=leave_running, options=opts
            )
            break
        except LaminaError as exc:
            if (attempt == DUMP_ATTEMPTS or not seize_failed(log)
                    or launcher.info(task_id).status not in live):
                tries = f" (attempt {attempt} of {DUMP_ATTEMPTS})" if attempt > 1 else ""
                raise type(exc)(f"{exc.message}{tries}{_criu_log_tail(log)}") from exc
        # keep the failed attempt's log beside the next one; drop its partial images
        log.rename(log.with_name(f"dump.{attempt}.log"))
        for leftover in image_dir.iterdir():
            if leftover.is_file() and not leftover.name.startswith("dump."):
                leftover.unlink()
        settle(0.5 * attempt)
    seconds = time.monotonic() - started

    config = json.loads((bundle / "config.json").read_text())
    linux = config.get("linux") or {}
    if linux.get("cgroupsPath") == launcher.bundles.cgroups_path(task_id):
        del linux["cgroupsPath"]  # a restore under another id gets its own
    meta = json.loads((bundle / "meta.json").read_text())
    record = {
        "task_id": task_id,
        "created": time.time(),
        "leave_running": leave_running,
        "options": list(opts),
        "spec": config,
        "mounts": meta.get("mounts", []),
    }
    write_json(image_dir / METADATA, record)  # 0600: the spec may hold secrets in its env
    if not leave_running:
        # the dump killed the container; let the shim record that
        launcher.wait_shim(bundle, 10.0)
    return CheckpointInfo(
        task_id=task_id,
        image_dir=image_dir,
        seconds=seconds,
        leave_running=leave_running,
        options=opts,
    )


def restore(
    launcher: Launcher,
    task_id: str,
    image_dir: Path,
    *,
    mounts: Sequence[Mount] | None = None,
    spec: dict[str, Any] | None = None,
    detach: bool = True,
    work_dir: Path | None = None,
    stdio: Stdio = INHERIT_STDIO,
) -> TaskInfo:
    """Restore the checkpoint in ``image_dir`` as task ``task_id``.

    If the task exists and is stopped (e.g. it was dumped without
    ``leave_running``) the restore reuses its bundle, remounting its rootfs if
    needed. Otherwise a new bundle is created from ``mounts`` and ``spec``
    (defaults: those recorded at checkpoint time). ``detach`` runs it under a
    monitor like a detached start; without it the call returns its exit code
    when it ends. CRIU's restore log goes to ``work_dir`` (default: the
    bundle's ``criu-restore/``).
    """
    rootless.refuse("CRIU restore", rootless.CRIU_ROOTLESS)
    validate_id(task_id)
    image_dir = image_dir.absolute()
    if not (image_dir / "inventory.img").exists():
        raise NotFound(f"no checkpoint in {image_dir}")
    saved = _saved(image_dir)
    opts = _restore_flags(saved)
    _require_criu()

    bundles = launcher.bundles
    with bundles.lock(task_id):
        bundle = bundles.path(task_id)
        created_here = False
        if bundles.exists(task_id):
            info = launcher.info(task_id)
            if info.status != TaskStatus.STOPPED:
                raise AlreadyExists(f"task {task_id} exists and is {info.status}")
            launcher.wait_shim(bundle, 10.0)
            with contextlib.suppress(NotFound):
                launcher.runc.delete(task_id, force=True)
            meta = json.loads((bundle / "meta.json").read_text())
            if spec is not None:
                config = dict(spec)
                config.setdefault("root", {})["path"] = "rootfs"
                config.setdefault("linux", {}).setdefault(
                    "cgroupsPath", bundles.cgroups_path(task_id)
                )
                write_json(bundle / "config.json", config)
            rootfs = bundle / "rootfs"
            if not is_mountpoint(rootfs):
                use = (
                    list(mounts)
                    if mounts
                    else [mount_from_json(m) for m in meta.get("mounts", [])]
                )
                if not use:
                    raise InvalidArgument(f"task {task_id}: no rootfs mounts to restore into")
                mount_rootfs(bundle, use)  # as at start
                meta["mounts"] = [mount_to_json(m) for m in use]
            meta["detached"] = detach
            meta["restored_from"] = str(image_dir)
            write_json(bundle / "meta.json", meta)
        else:
            use_spec = spec if spec is not None else saved.get("spec")
            use_mounts = (
                list(mounts) if mounts else [mount_from_json(m) for m in saved.get("mounts", [])]
            )
            if not isinstance(use_spec, dict) or not use_mounts:
                raise InvalidArgument(
                    f"restore {task_id}: need a spec and rootfs mounts "
                    "(none given and none recorded with the checkpoint)"
                )
            bundle = bundles.create(
                task_id,
                use_mounts,
                use_spec,
                detached=detach,
                extra_meta={"restored_from": str(image_dir)},
            )
            created_here = True

        wd = work_dir.absolute() if work_dir is not None else bundle / "criu-restore"
        wd.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in ("exit.json", "runc.pid"):
            with contextlib.suppress(FileNotFoundError):
                (bundle / name).unlink()
        args = [
            "restore",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(bundle / "runc.pid"),
            "--image-path",
            str(image_dir),
            "--work-path",
            str(wd),
            *opts,
            task_id,
        ]
        try:
            if detach:
                return launcher.detached(task_id, bundle, args, what=f"restore {task_id}")
            return launcher.foreground(task_id, bundle, args, stdio=stdio,
                                       what=f"restore {task_id}")
        except LaminaError as exc:
            tail = _criu_log_tail(wd / "restore.log")
            if created_here:
                with contextlib.suppress(LaminaError):
                    launcher.cleanup_failed(task_id, bundle)
            raise type(exc)(f"{exc.message}{tail}") from exc
