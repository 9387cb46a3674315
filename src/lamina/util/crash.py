"""Deterministic crash points for kill tests (inert unless the environment asks).

Code calls :func:`point` at every step where a crash would leave a distinct
state on disk. With ``LAMINA_CRASH_AT=NAME`` the process SIGKILLs itself at
the named point; with ``LAMINA_CRASH_AFTER=N`` at the N-th point it passes
(counting from 1), whatever its name. ``LAMINA_CRASH_LOG=FILE`` appends
``N NAME`` for the point it dies at; with ``LAMINA_CRASH_TRACE=FILE`` it
appends that line for every point passed and does not die, so a test can
choose which points to kill at. Otherwise a call costs one comparison.
"""

from __future__ import annotations

import os
import signal

__all__ = ["point"]

_AT = os.environ.get("LAMINA_CRASH_AT", "")
_AFTER = int(os.environ.get("LAMINA_CRASH_AFTER", "0") or 0)
_TRACE = os.environ.get("LAMINA_CRASH_TRACE", "")
_ARMED = bool(_AT or _AFTER or _TRACE)
_count = 0


def point(name: str) -> None:
    """A place where a kill test may stop the process."""
    if not _ARMED:
        return
    global _count
    _count += 1
    if _TRACE:
        with open(_TRACE, "a", encoding="utf-8") as f:
            f.write(f"{_count} {name}\n")
    if name == _AT or _count == _AFTER:
        if os.environ.get("LAMINA_CRASH_LOG"):
            with open(os.environ["LAMINA_CRASH_LOG"], "a", encoding="utf-8") as f:
                f.write(f"{_count} {name}\n")
        os.kill(os.getpid(), signal.SIGKILL)
