"""Progress reporting for long work: import, unpack, diff, checkpoint.

Library code takes a :class:`Progress` and calls :meth:`Progress.event`;
the CLI chooses the face: a live display on a terminal (rich), JSON lines
with ``--json``, nothing at all when output is piped.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

__all__ = ["JsonProgress", "Progress", "TerminalProgress", "for_cli"]


class Progress:
    """Silent progress: the default for library callers."""

    def event(self, phase: str, item: str, *, done: int = 0, total: int = 0,
              status: str = "") -> None:
        """``item`` (a layer digest, a file...) in ``phase`` has ``done`` of ``total``."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonProgress(Progress):
    """One JSON object per line on ``out``."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out or sys.stdout

    def event(self, phase: str, item: str, *, done: int = 0, total: int = 0,
              status: str = "") -> None:
        rec: dict[str, Any] = {"time": round(time.time(), 3), "phase": phase, "item": item}
        if total:
            rec.update(done=done, total=total)
        if status:
            rec["status"] = status
        self._out.write(json.dumps(rec) + "\n")
        self._out.flush()


class TerminalProgress(Progress):
    """A live table of items and their state on a terminal (stderr)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, TextColumn
        from rich.progress import Progress as RichProgress

        self._rich = RichProgress(
            TextColumn("{task.fields[phase]:>9}"), TextColumn("{task.description}"),
            BarColumn(), DownloadColumn(), TextColumn("{task.fields[status]}"),
            console=Console(stderr=True), transient=False,
        )
        self._tasks: dict[tuple[str, str], Any] = {}
        self._rich.start()

    def event(self, phase: str, item: str, *, done: int = 0, total: int = 0,
              status: str = "") -> None:
        key = (phase, item)
        short = item.split(":")[-1][:12] if item.startswith("sha256:") else item
        if key not in self._tasks:
            self._tasks[key] = self._rich.add_task(short, total=total or None,
                                                   phase=phase, status=status)
        self._rich.update(self._tasks[key], completed=done, total=total or None,
                          status=status)

    def close(self) -> None:
        self._rich.stop()


def for_cli(*, json_lines: bool) -> Progress:
    """The right progress face for a command: JSON when asked, live on a TTY, else none."""
    if json_lines:
        return JsonProgress()
    if sys.stderr.isatty():
        return TerminalProgress()
    return Progress()
