"""A thin, typed wrapper around the ``runc`` command line.

Every call uses ``runc --root <root>`` so lamina's containers live in their own
runc state directory and never see (or touch) anybody else's. Failures are
mapped onto lamina's error classes from runc's message: an unknown container
is :class:`~lamina.errors.NotFound`, a duplicate id
:class:`~lamina.errors.AlreadyExists`, a container in the wrong state
:class:`~lamina.errors.FailedPrecondition`.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import signal as _signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LaminaError,
    NotFound,
    Unavailable,
)
from lamina.util.signals import deferred

__all__ = ["Runc", "error_from_message", "find_runc", "parse_signal"]

_LOGRUS_MSG = re.compile(r'level=(?:error|fatal) msg="((?:[^"\\]|\\.)*)"')


def find_runc() -> str | None:
    """The runc binary in ``$PATH`` (plus the sbin directories), or None."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which("runc", path=path)


def parse_signal(sig: int | str) -> int:
    """A signal number from ``9``, ``"9"``, ``"KILL"`` or ``"SIGKILL"``."""
    if isinstance(sig, int):
        number = sig
    else:
        text = sig.strip().upper()
        if text.isdigit():
            number = int(text)
        else:
            if not text.startswith("SIG"):
                text = "SIG" + text
            try:
                number = int(_signal.Signals[text])
            except KeyError:
                raise InvalidArgument(f"unknown signal {sig!r}") from None
    if not 0 < number < 65:
        raise InvalidArgument(f"signal out of range: {sig!r}")
    return number


def error_from_message(message: str, what: str) -> LaminaError:
    """The lamina error class a runc error message stands for."""
    text = message.strip()
    low = text.lower()
    if "does not exist" in low or "container not found" in low:
        return NotFound(f"{what}: {text}")
    if "already exists" in low or ("container with id" in low and "exists" in low):
        return AlreadyExists(f"{what}: {text}")
    if any(
        s in low
        for s in (
            "not running",
            "not paused",
            "is paused",
            "is stopped",
            "stopped container",
            "container is not",
            "cannot exec",
            "is running",
            "cannot delete",
        )
    ):
        return FailedPrecondition(f"{what}: {text}")
    if "executable file not found" in low or "no such file or directory" in low:
        return NotFound(f"{what}: {text}")
    if "resource temporarily unavailable" in low or "device or resource busy" in low:
        return Unavailable(f"{what}: {text}")
    return Internal(f"{what}: {text or 'runc failed'}")


def _last_error(output: str) -> str:
    """The most useful line of runc's stderr (or of its JSON log)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("level") in ("error", "fatal") and obj.get("msg"):
                return str(obj["msg"])
        else:
            match = _LOGRUS_MSG.search(line)
            if match:
                return match.group(1).encode().decode("unicode_escape", errors="replace")
            return line
    return lines[-1] if lines else ""


class Runc:
    """``runc --root ROOT ...`` with errors mapped to lamina's."""

    def __init__(self, root: str | os.PathLike[str], binary: str | None = None) -> None:
        self.root = Path(root)
        found = binary or find_runc()
        if found is None:
            raise Unavailable("runc is not installed (no `runc` in PATH)")
        self.binary = found

    def argv(self, *args: str, log: str | os.PathLike[str] | None = None) -> list[str]:
        """The full command line for ``runc <args>`` on this root."""
        words = [self.binary, "--root", str(self.root)]
        if log is not None:
            words += ["--log", os.fspath(log), "--log-format", "json"]
        return [*words, *args]

    def _run(
        self, what: str, *args: str, timeout: float | None = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``runc <args>`` to its end. A SIGTERM or SIGHUP while it runs is
        raised after that end (within ``timeout``): runc killed half-way leaves
        what it began half-done — a CRIU dump runs on without it and freezes the
        task again after lamina has thawed it."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            with deferred():
                proc = subprocess.run(
                    self.argv(*args),
                    capture_output=True,
                    text=True,
                    stdin=subprocess.DEVNULL,
                    timeout=timeout,
                    check=False,
                )
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"{what}: runc timed out after {timeout}s") from exc
        if proc.returncode != 0:
            raise error_from_message(_last_error(proc.stderr) or proc.stdout, what)
        return proc

    # -- queries -----------------------------------------------------------

    def state(self, container_id: str) -> dict[str, Any]:
        """``runc state``: the container's state object (NotFound if runc has none)."""
        proc = self._run(f"state {container_id}", "state", container_id)
        try:
            obj: dict[str, Any] = json.loads(proc.stdout)
        except ValueError as exc:
            raise Internal(f"runc state {container_id}: bad JSON: {exc}") from exc
        return obj

    def list(self) -> builtins.list[dict[str, Any]]:
        """``runc list``: every container runc knows on this root."""
        if not self.root.exists():
            return []
        proc = self._run("list", "list", "--format", "json")
        text = proc.stdout.strip()
        if not text or text == "null":
            return []
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise Internal(f"runc list: bad JSON: {exc}") from exc
        return [dict(i) for i in items or []]

    def ps(self, container_id: str) -> builtins.list[int]:
        """Host pids of every process in the container."""
        proc = self._run(f"ps {container_id}", "ps", "--format", "json", container_id)
        text = proc.stdout.strip()
        if not text or text == "null":
            return []
        return [int(p) for p in json.loads(text)]

    # -- operations --------------------------------------------------------

    def kill(self, container_id: str, sig: int, *, all_processes: bool = False) -> None:
        args = ["kill"]
        if all_processes:
            args.append("--all")
        self._run(f"kill {container_id}", *args, container_id, str(sig))

    def pause(self, container_id: str) -> None:
        self._run(f"pause {container_id}", "pause", container_id)

    def resume(self, container_id: str) -> None:
        self._run(f"resume {container_id}", "resume", container_id)

    def delete(self, container_id: str, *, force: bool = False) -> None:
        args = ["delete"]
        if force:
            args.append("--force")
        self._run(f"delete {container_id}", *args, container_id)

    def checkpoint(
        self,
        container_id: str,
        image_path: str | os.PathLike[str],
        *,
        work_path: str | os.PathLike[str] | None = None,
        leave_running: bool = False,
        options: Sequence[str] = (),
        timeout: float | None = 600.0,
    ) -> None:
        args = ["checkpoint", "--image-path", os.fspath(image_path)]
        if work_path is not None:
            args += ["--work-path", os.fspath(work_path)]
        if leave_running:
            args.append("--leave-running")
        args += list(options)
        self._run(f"checkpoint {container_id}", *args, container_id, timeout=timeout)
